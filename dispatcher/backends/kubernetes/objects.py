"""The Kubernetes objects spinyard creates, built by pure functions.

A viz instance is a Deployment (one replica), a ClusterIP Service and a
route: a Traefik IngressRoute (a custom object, so a plain dict here) or a
networking.k8s.io/v1 Ingress. A run is a batch/v1 Job and a Secret holding
its inputs and presigned upload URLs, owned by the Job so it goes with it.
The pods come from the operator's pod templates (k8s/base/pod-templates,
parsed YAML passed in here); the builders fill in the app's container and
enforce what the NetworkPolicies and the restricted Pod Security Standard
rely on, whatever a template says: no service account token, non-root,
seccomp RuntimeDefault, a read-only root file system with an emptyDir at
/tmp, no privilege escalation and no capabilities.

Everything carries `app.kubernetes.io/managed-by=spinyard` (the backend finds
its objects by it), `app.kubernetes.io/component=viz|job` (the
NetworkPolicies select on it), `spinyard.io/app` and `spinyard.io/instance`,
and a created-at annotation. Names come from `slugs.slug` of the instance or
job id, so any object can be found from the id alone. Nothing here talks to
the API; `kubernetes.py` does, through `k8s_api.py`.
"""

import copy
import datetime
import json
import math
import re
from dataclasses import dataclass
from typing import Literal

from kubernetes import client

from dispatcher.backends.base import JobLaunch, instance_prefix
from dispatcher.backends.kubernetes.slugs import slug
from schemas.spec import AppSpec

MANAGED_BY, MANAGER = "app.kubernetes.io/managed-by", "spinyard"
COMPONENT = "app.kubernetes.io/component"
APP = "spinyard.io/app"  # owner.title, made a valid label value
INSTANCE = "spinyard.io/instance"
POOLED = "spinyard.io/pooled"
APP_NAME = "spinyard.io/app-name"  # annotation: owner/title exactly, as label values cannot
CREATED_AT = "spinyard.io/created-at"  # annotation: RFC 3339, UTC
SELECTOR = f"{MANAGED_BY}={MANAGER}"

VIZ_CONTAINER, JOB_CONTAINER = "app", "job"
HTTP_PORT = 80  # the Service's port; it forwards to the container's named port "http"
RUN_DIR = "/var/run/spinyard"
OUTPUT_DIR = "/tmp/outputs"
INPUTS_FILE, UPLOADS_FILE = "inputs.json", "uploads.json"
READINESS_PERIOD_S = 1  # cold starts wait on the first passing probe: keep it short

# The templates of k8s/base/pod-templates, for when none is mounted (tests check they agree).
DEFAULT_TEMPLATES: dict[str, dict] = {
    component: {
        "metadata": {"labels": {MANAGED_BY: MANAGER, COMPONENT: component}},
        "spec": {
            **({"restartPolicy": "Never"} if component == "job" else {}),
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 10001,
                "runAsGroup": 10001,
                "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": container,
                    "env": [{"name": "HOME", "value": "/tmp"}],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                }
            ],
            "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": size}}],
        },
    }
    for component, container, size in (("viz", VIZ_CONTAINER, "1Gi"), ("job", JOB_CONTAINER, "4Gi"))
}

_PLACEHOLDER = re.compile(r"\{(port|prefix|host|python)\}")
_HOST_PLACEHOLDER = re.compile(r"\{(owner|title|instance)\}")


@dataclass(frozen=True)
class Routing:
    """How viz instances are reached from outside (the backend's route settings)."""

    kind: Literal["ingressroute", "ingress"] = "ingressroute"
    ingress_class: str | None = "traefik"
    host: str | None = None  # may hold {owner}, {title}, {instance}
    public_base_url: str = "http://localhost"  # may hold the same placeholders


# -- names, labels, metadata --


def object_name(instance_id: str) -> str:
    """The name of every object of a viz instance or a run: its id, made safe."""
    return slug(instance_id)


def secret_name(job_id: str) -> str:
    """The name of a run's inputs Secret."""
    return slug(f"{job_id}-run")


def app_label(app: str) -> str:
    """The `spinyard.io/app` label value of `owner/title`: `owner.title` when that fits."""
    return slug(app.replace("/", "."), extra="._")


def labels(app: str, instance_id: str, component: Literal["viz", "job"]) -> dict[str, str]:
    """The labels every object of an instance or run carries."""
    return {
        MANAGED_BY: MANAGER,
        COMPONENT: component,
        APP: app_label(app),
        INSTANCE: instance_id,
    }


def rfc3339(t: float) -> str:
    """Unix time `t` as RFC 3339 UTC with microseconds, as the created-at annotation holds it."""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> float:
    """The Unix time of an RFC 3339 timestamp (Kubernetes' or ours).

    Raises:
        ValueError: not a timestamp.
    """
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _meta(
    name: str,
    app: str,
    instance_id: str,
    component: Literal["viz", "job"],
    created_at: float,
    owner: client.V1OwnerReference | None = None,
    extra_labels: dict[str, str] | None = None,
) -> client.V1ObjectMeta:
    return client.V1ObjectMeta(
        name=name,
        labels=labels(app, instance_id, component) | (extra_labels or {}),
        annotations={APP_NAME: app, CREATED_AT: rfc3339(created_at)},
        owner_references=[owner] if owner is not None else None,
    )


def owner_reference(obj: dict) -> client.V1OwnerReference:
    """A reference to `obj` (as the API returned it) for objects that should go with it.

    `blockOwnerDeletion` stays false: setting it needs rights on the owner's
    finalizers, which the Role does not grant.

    Raises:
        ValueError: `obj` has no uid (it was not returned by the API server).
    """
    meta = obj.get("metadata") or {}
    if not meta.get("uid"):
        raise ValueError(f"{obj.get('kind')} {meta.get('name')} has no uid")
    return client.V1OwnerReference(
        api_version=obj["apiVersion"],
        kind=obj["kind"],
        name=meta["name"],
        uid=meta["uid"],
        block_owner_deletion=False,
    )


# -- URLs and hosts --


def fill(text: str, values: dict[str, str]) -> str:
    """Replace `{port}`, `{prefix}`, `{host}` and `{python}` found in `values`; leave the rest."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


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


# -- pods --


def _pod_template(
    template: dict,
    component: Literal["viz", "job"],
    container_name: str,
    pod_labels: dict[str, str],
) -> tuple[client.V1PodTemplateSpec, client.V1Container]:
    """The operator's template with our labels and the security rules enforced."""
    pod = client.V1PodTemplateSpec.from_dict(copy.deepcopy(template))
    pod.metadata = pod.metadata or client.V1ObjectMeta()
    pod.metadata.labels = (pod.metadata.labels or {}) | pod_labels
    spec = pod.spec or client.V1PodSpec(containers=[])
    pod.spec = spec
    spec.automount_service_account_token = False
    spec.enable_service_links = False
    spec.host_network = spec.host_pid = spec.host_ipc = None
    psc = spec.security_context or client.V1PodSecurityContext()
    psc.run_as_non_root = True
    if psc.run_as_user == 0:
        psc.run_as_user = None
    psc.seccomp_profile = client.V1SeccompProfile(type="RuntimeDefault")
    spec.security_context = psc

    container = next((c for c in spec.containers if c.name == container_name), None)
    if container is None:
        container = client.V1Container(name=container_name)
        spec.containers = [container, *spec.containers]
    csc = container.security_context or client.V1SecurityContext()
    csc.allow_privilege_escalation = False
    csc.privileged = None
    csc.read_only_root_filesystem = True
    csc.capabilities = client.V1Capabilities(drop=["ALL"])
    if csc.run_as_user == 0:
        csc.run_as_user = None
    container.security_context = csc
    mounts = container.volume_mounts or []
    volumes = spec.volumes or []
    if not any(m.mount_path == "/tmp" for m in mounts):
        if not any(v.name == "tmp" for v in volumes):
            volumes.append(client.V1Volume(name="tmp", empty_dir=client.V1EmptyDirVolumeSource()))
        mounts.append(client.V1VolumeMount(name="tmp", mount_path="/tmp"))
    container.volume_mounts = mounts
    spec.volumes = volumes
    return pod, container


def _env(container: client.V1Container, values: dict[str, str]) -> list[client.V1EnvVar]:
    """The template's variables, then `values`; a later name replaces an earlier one in place."""
    merged = {e.name: e for e in container.env or []}
    for name, value in values.items():
        merged[name] = client.V1EnvVar(name=name, value=value)
    return list(merged.values())


def _resources(spec: AppSpec) -> client.V1ResourceRequirements:
    amounts = {"cpu": spec.resources.cpu, "memory": spec.resources.memory}
    return client.V1ResourceRequirements(requests=dict(amounts), limits=dict(amounts))


def _image(spec: AppSpec) -> str:
    if not spec.image:
        raise ValueError(f"app {spec.name} has no image: the Kubernetes backend needs `image`")
    return spec.image


# -- viz instances --


def make_viz_deployment(
    spec: AppSpec,
    instance_id: str,
    *,
    template: dict,
    created_at: float,
    pooled: bool = False,
    image_pull_policy: str | None = None,
) -> client.V1Deployment:
    """The Deployment of one viz instance: one replica of the app's image under its prefix.

    `{port}`, `{prefix}`, `{host}` (0.0.0.0) and `{python}` (python) are filled in
    the command and in `spec.env`; the app also gets SPINYARD_PORT,
    SPINYARD_PREFIX, SPINYARD_INSTANCE and SPINYARD_APP. The readiness probe
    asks for `<prefix><readiness_path>`. A Deployment that has no ready pod
    within the app's start timeout is marked failed by Kubernetes
    (progressDeadlineSeconds), which `list_instances` reports as not alive.

    Args:
        spec: the app (kind viz).
        instance_id: the instance's id.
        template: the viz pod template (a PodTemplateSpec as a dict).
        created_at: Unix time, for the created-at annotation.
        pooled: label the Deployment as a warm pool member.
        image_pull_policy: the container's imagePullPolicy, if not the default.

    Raises:
        ValueError: the spec has no image.
    """
    prefix = instance_prefix(instance_id, spec)
    values = {"port": str(spec.port), "prefix": prefix, "host": "0.0.0.0", "python": "python"}
    ours = {"PORT": str(spec.port), "PREFIX": prefix, "INSTANCE": instance_id, "APP": spec.name}
    select = {MANAGED_BY: MANAGER, INSTANCE: instance_id}
    pod, container = _pod_template(
        template, "viz", VIZ_CONTAINER, labels(spec.name, instance_id, "viz")
    )
    container.image = _image(spec)
    container.image_pull_policy = image_pull_policy
    container.command = [fill(arg, values) for arg in spec.command]
    container.args = None
    container.env = _env(
        container,
        {k: fill(v, values) for k, v in spec.env.items()}
        | {f"SPINYARD_{k}": v for k, v in ours.items()},
    )
    container.ports = [client.V1ContainerPort(name="http", container_port=spec.port)]
    container.resources = _resources(spec)
    container.readiness_probe = client.V1Probe(
        http_get=client.V1HTTPGetAction(path=prefix.rstrip("/") + spec.readiness_path, port="http"),
        period_seconds=READINESS_PERIOD_S,
        timeout_seconds=2,
        failure_threshold=3,
    )
    return client.V1Deployment(
        api_version="apps/v1",
        kind="Deployment",
        metadata=_meta(
            object_name(instance_id),
            spec.name,
            instance_id,
            "viz",
            created_at,
            extra_labels={POOLED: "true"} if pooled else None,
        ),
        spec=client.V1DeploymentSpec(
            replicas=1,
            selector=client.V1LabelSelector(match_labels=select),
            strategy=client.V1DeploymentStrategy(type="Recreate"),
            revision_history_limit=0,
            progress_deadline_seconds=max(1, math.ceil(spec.start_timeout_s)),
            template=pod,
        ),
    )


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
        metadata=_meta(object_name(instance_id), spec.name, instance_id, "viz", created_at, owner),
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
        metadata=_meta(object_name(instance_id), spec.name, instance_id, "viz", created_at, owner),
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
    meta = _meta(object_name(instance_id), spec.name, instance_id, "viz", created_at, owner)
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


# -- runs --


def make_job(
    launch: JobLaunch,
    spec: AppSpec,
    *,
    template: dict,
    created_at: float,
    backoff_limit: int = 0,
    ttl_s: int = 24 * 3600,
    image_pull_policy: str | None = None,
    suspend: bool = True,
) -> client.V1Job:
    """The Job of one run, created suspended until its inputs Secret exists.

    The pod reads its inputs and upload URLs from files of the Secret mounted
    at /var/run/spinyard, writes outputs under /tmp/outputs (an emptyDir) and
    uploads them itself with HTTP PUT. `{python}` in the command is `python`.
    The run's deadline is the Job's activeDeadlineSeconds: Kubernetes stops
    it and marks it Failed with reason DeadlineExceeded.

    Raises:
        ValueError: the spec has no image.
    """
    name = object_name(launch.job_id)
    pod, container = _pod_template(
        template, "job", JOB_CONTAINER, labels(spec.name, launch.job_id, "job")
    )
    pod.spec.restart_policy = "Never"
    container.image = _image(spec)
    container.image_pull_policy = image_pull_policy
    container.command = [fill(arg, {"python": "python"}) for arg in spec.command]
    container.args = None
    container.env = _env(
        container,
        dict(spec.env)
        | {
            "SPINYARD_JOB_ID": launch.job_id,
            "SPINYARD_APP": spec.name,
            "SPINYARD_INPUTS": f"{RUN_DIR}/{INPUTS_FILE}",
            "SPINYARD_UPLOADS": f"{RUN_DIR}/{UPLOADS_FILE}",
            "SPINYARD_OUTPUT_DIR": OUTPUT_DIR,
            "SPINYARD_DEADLINE_S": f"{launch.deadline_s:g}",
        },
    )
    container.resources = _resources(spec)
    container.volume_mounts = [
        *(container.volume_mounts or []),
        client.V1VolumeMount(name="spinyard-run", mount_path=RUN_DIR, read_only=True),
        client.V1VolumeMount(name="outputs", mount_path=OUTPUT_DIR),
    ]
    pod.spec.volumes = [
        *(pod.spec.volumes or []),
        client.V1Volume(
            name="spinyard-run",
            secret=client.V1SecretVolumeSource(
                secret_name=secret_name(launch.job_id), default_mode=0o440
            ),
        ),
        client.V1Volume(name="outputs", empty_dir=client.V1EmptyDirVolumeSource()),
    ]
    return client.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=_meta(name, spec.name, launch.job_id, "job", created_at),
        spec=client.V1JobSpec(
            backoff_limit=backoff_limit,
            active_deadline_seconds=max(1, math.ceil(launch.deadline_s)),
            ttl_seconds_after_finished=ttl_s,
            completions=1,
            parallelism=1,
            suspend=suspend,
            template=pod,
        ),
    )


def make_job_secret(
    launch: JobLaunch,
    app: str,
    *,
    owner: client.V1OwnerReference,
    created_at: float,
) -> client.V1Secret:
    """The Secret a run's pod mounts: its inputs and presigned upload URLs, nothing else.

    `owner` is the run's Job: Kubernetes deletes the Secret with it.
    """
    return client.V1Secret(
        api_version="v1",
        kind="Secret",
        metadata=_meta(secret_name(launch.job_id), app, launch.job_id, "job", created_at, owner),
        type="Opaque",
        immutable=True,
        string_data={
            INPUTS_FILE: json.dumps(launch.inputs, sort_keys=True),
            UPLOADS_FILE: json.dumps(launch.upload_urls, sort_keys=True),
        },
    )
