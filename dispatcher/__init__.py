"""spinyard's runtime: settings, NATS setup, consumer loop, backends, gateway and CLI."""
