"""The Kubernetes backend: viz apps as Deployments, runs as Jobs, through the official client."""
