"""The backend interface and the one place that picks an implementation.

Handlers depend on `handlers.ports.Backend`; this module re-exports it with
its data classes for the implementations here, and builds the configured
backend from `Settings` (a plain `local` | `kubernetes` setting, no class
paths). It also holds the small helpers every backend needs to agree on, such
as the URL path prefix under which an instance is served.
"""

from dispatcher.settings import Settings, SettingsError
from handlers.ports import Backend, Instance, JobLaunch
from schemas.spec import AppSpec

__all__ = [
    "Backend",
    "Instance",
    "JobLaunch",
    "gateway_url",
    "http_host",
    "instance_prefix",
    "make_backend",
]


def instance_prefix(instance_id: str, spec: AppSpec) -> str:
    """The URL path an instance is served under, with leading and trailing `/`.

    The gateway (local backend) or the ingress route (Kubernetes) passes this
    prefix to the app unchanged, so the app must serve below it.
    """
    return f"/apps/{spec.owner}/{spec.title}/{instance_id}/"


def http_host(host: str) -> str:
    """`host` as it goes in a URL: IPv6 literals get brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def gateway_url(settings: Settings) -> str:
    """The base URL pages use to reach the gateway, without a trailing `/`.

    Raises:
        ValueError: the gateway port is 0 (chosen at bind time) and no
            `gateway.public_url` is set, so the URL cannot be known yet.
    """
    gw = settings.gateway
    if gw.public_url:
        return gw.public_url.rstrip("/")
    if gw.port == 0:
        raise SettingsError(
            "gateway.port is 0, so the public URL is unknown: set gateway.public_url "
            "once the gateway has bound its port, before making the backend"
        )
    return f"http://{http_host(gw.host)}:{gw.port}"


def make_backend(settings: Settings) -> Backend:
    """Build the backend named by `settings.backend.kind`. Call `setup()` on it before use.

    Raises:
        NotImplementedError: the kind is known but not built yet.
        ValueError: the settings do not allow the backend to be built.
    """
    kind = settings.backend.kind
    if kind == "local":
        from dispatcher.backends.local import LocalBackend

        return LocalBackend(settings.backend.local, settings.data_dir, gateway_url(settings))
    elif kind == "kubernetes":
        from dispatcher.backends.kubernetes import KubernetesBackend

        k8s = settings.backend.kubernetes
        return KubernetesBackend(k8s, k8s.public_base_url or gateway_url(settings))
    raise ValueError(f"unknown backend kind {kind!r}")
