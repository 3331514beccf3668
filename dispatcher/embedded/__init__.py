"""The embedded stack on one machine: `spinyard up`, and the nats-server and S3 server it starts."""
