"""spinyard's runtime: settings, NATS setup, the consumer loop, backends, the gateway and the CLI."""
