"""How a viz instance is reached: its Service, its route and the URL a browser opens.

Each instance gets a ClusterIP Service in front of its pod and a route for
its URL prefix (and host, if the operator set one): a Traefik IngressRoute
(a custom object, so a plain dict here) or a networking.k8s.io/v1 Ingress.
Both are owned by the instance's Deployment, so Kubernetes removes them
with it. Pure: nothing here talks to the API.
"""

import re
from dataclasses import dataclass
from typing import Literal

from kubernetes import client

from dispatcher.backends.base import instance_prefix
from dispatcher.backends.kubernetes.meta import INSTANCE, MANAGED_BY, MANAGER, metadata, object_name
from dispatcher.backends.kubernetes.slugs import slug
from schemas.spec import AppSpec

HTTP_PORT = 80  # the Service's port; it forwards to the container's named port "http"

_HOST_PLACEHOLDER = re.compile(r"\{(owner|title|instance)\}")


@dataclass(frozen=True)
class Routing:
    """How viz instances are reached from outside (the backend's route settings)."""

    kind: Literal["ingressroute", "ingress"] = "ingressroute"
    ingress_class: str | None = "traefik"
    host: str | None = None  # may hold {owner}, {title}, {instance}
    public_base_url: str = "http://localhost"  # may hold the same placeholders


# -- URLs and hosts --


def _host(template: str, spec: AppSpec, instance_id: str) -> str:
    """`template` with `{owner}`, `{title}`, `{instance}` filled, each DNS label made safe."""
    values = {"owner": spec.owner, "title": spec.title, "instance": instance_id}
    filled = _HOST_PLACEHOLDER.sub(lambda m: values[m.group(1)], template).lower()
    return ".".join(slug(part) for part in filled.split("."))


def route_host(routing: Routing, spec: AppSpec, instance_id: str) -> str | None:
    """The host an instance's route matches; None for any host."""
    return _host(routing.host, spec, instance_id) if routing.host else None


def public_url(routing: Routing, spec: AppSpec, instance_id: str) -> str:
    """The URL a browser opens: the base URL, the instance's prefix and the entry path."""
    base = routing.public_base_url.rstrip("/")
    if _HOST_PLACEHOLDER.search(base):
        scheme, sep, rest = base.partition("://")
        netloc, slash, path = rest.partition("/")
        host, colon, port = netloc.partition(":")
        netloc = _host(host, spec, instance_id) + colon + port
        base = f"{scheme}{sep}{netloc}{slash}{path}"
    return base + instance_prefix(instance_id, spec) + spec.entry_path


# -- the Service and the route --


def make_service(
    spec: AppSpec,
    instance_id: str,
    *,
    created_at: float,
    owner: client.V1OwnerReference | None = None,
) -> client.V1Service:
    """The ClusterIP Service in front of an instance's pod, port 80 to the app's port.

    `owner` (the Deployment) makes Kubernetes delete it with the Deployment,
    should spinyard stop before deleting it itself.
    """
    return client.V1Service(
        api_version="v1",
        kind="Service",
        metadata=_meta(spec, instance_id, created_at, owner),
        spec=client.V1ServiceSpec(
            type="ClusterIP",
            selector={MANAGED_BY: MANAGER, INSTANCE: instance_id},
            ports=[
                client.V1ServicePort(
                    name="http", port=HTTP_PORT, target_port="http", protocol="TCP"
                )
            ],
        ),
    )


def make_ingress(
    spec: AppSpec,
    instance_id: str,
    *,
    routing: Routing,
    created_at: float,
    owner: client.V1OwnerReference | None = None,
) -> client.V1Ingress:
    """A networking.k8s.io/v1 Ingress for the instance's prefix (and host, if set)."""
    path = client.V1HTTPIngressPath(
        path=instance_prefix(instance_id, spec),
        path_type="Prefix",
        backend=client.V1IngressBackend(
            service=client.V1IngressServiceBackend(
                name=object_name(instance_id),
                port=client.V1ServiceBackendPort(number=HTTP_PORT),
            )
        ),
    )
    return client.V1Ingress(
        api_version="networking.k8s.io/v1",
        kind="Ingress",
        metadata=_meta(spec, instance_id, created_at, owner),
        spec=client.V1IngressSpec(
            ingress_class_name=routing.ingress_class,
            rules=[
                client.V1IngressRule(
                    host=route_host(routing, spec, instance_id),
                    http=client.V1HTTPIngressRuleValue(paths=[path]),
                )
            ],
        ),
    )


def make_ingressroute(
    spec: AppSpec,
    instance_id: str,
    *,
    routing: Routing,
    created_at: float,
    owner: client.V1OwnerReference | None = None,
) -> dict:
    """A Traefik IngressRoute (traefik.io/v1alpha1) for the instance's prefix (and host)."""
    match = f"PathPrefix(`{instance_prefix(instance_id, spec)}`)"
    host = route_host(routing, spec, instance_id)
    if host:
        match = f"Host(`{host}`) && {match}"
    meta = _meta(spec, instance_id, created_at, owner)
    return {
        "apiVersion": "traefik.io/v1alpha1",
        "kind": "IngressRoute",
        "metadata": meta.model_dump(by_alias=True, exclude_none=True, mode="json"),
        "spec": {
            "routes": [
                {
                    "kind": "Rule",
                    "match": match,
                    "services": [{"name": object_name(instance_id), "port": HTTP_PORT}],
                }
            ]
        },
    }


def make_route(
    spec: AppSpec,
    instance_id: str,
    *,
    routing: Routing,
    created_at: float,
    owner: client.V1OwnerReference | None = None,
) -> client.V1Ingress | dict:
    """The route `routing.kind` asks for: an IngressRoute (dict) or an Ingress."""
    make = make_ingressroute if routing.kind == "ingressroute" else make_ingress
    return make(spec, instance_id, routing=routing, created_at=created_at, owner=owner)


def _meta(
    spec: AppSpec, instance_id: str, created_at: float, owner: client.V1OwnerReference | None
) -> client.V1ObjectMeta:
    return metadata(object_name(instance_id), spec.name, instance_id, "viz", created_at, owner)
