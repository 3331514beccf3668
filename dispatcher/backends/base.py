"""What both backends agree on: where an instance is served, and how a host goes in a URL.

The backend interface itself is `handlers.ports.Backend` (handlers depend on
it); the implementations are `dispatcher.backends.local` and
`dispatcher.backends.kubernetes`, which import nothing of each other. The
composition root (`dispatcher.compose`) picks one by `settings.backend.kind`.
The launch contract (placeholders, environments, ids) is `launch.py`.
"""

from handlers.ports import Backend, Instance, JobLaunch
from schemas.spec import AppSpec

__all__ = ["Backend", "Instance", "JobLaunch", "http_host", "instance_prefix"]


def instance_prefix(instance_id: str, spec: AppSpec) -> str:
    """The URL path an instance is served under, with leading and trailing `/`.

    The gateway (local backend) or the ingress route (Kubernetes) passes this
    prefix to the app unchanged, so the app must serve below it.
    """
    return f"/apps/{spec.owner}/{spec.title}/{instance_id}/"


def http_host(host: str) -> str:
    """`host` as it goes in a URL: IPv6 literals get brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
