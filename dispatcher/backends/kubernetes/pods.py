"""The pods spinyard runs: the operator's templates, with the security rules enforced.

Pods come from the operator's pod templates (k8s/base/pod-templates, parsed
YAML passed in by the backend); `pod_template` fills in spinyard's labels
and enforces what the NetworkPolicies and the restricted Pod Security
Standard rely on, whatever a template says: no service account token,
non-root, seccomp RuntimeDefault, a read-only root file system with an
emptyDir at /tmp, no privilege escalation and no capabilities. The
builders in `objects.py` then put the app's container in. Pure: nothing
here talks to the API.
"""

import copy
from typing import Literal

from kubernetes import client

from dispatcher.backends.kubernetes.meta import COMPONENT, MANAGED_BY, MANAGER, app_secrets_name
from schemas.spec import AppSpec

VIZ_CONTAINER, JOB_CONTAINER = "app", "job"

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


def pod_template(
    template: dict,
    component: Literal["viz", "job"],
    container_name: str,
    pod_labels: dict[str, str],
) -> tuple[client.V1PodTemplateSpec, client.V1Container]:
    """The operator's template with our labels and the security rules enforced.

    Args:
        template: a PodTemplateSpec as a dict; it is copied, not changed.
        component: `viz` or `job`.
        container_name: the app's container, added first if the template has none of that name.
        pod_labels: labels added to the template's.

    Returns:
        The pod template and the app's container in it, for the caller to fill in.
    """
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


def merge_env(container: client.V1Container, values: dict[str, str]) -> list[client.V1EnvVar]:
    """The template's variables, then `values`; a later name replaces an earlier one in place."""
    merged = {e.name: e for e in container.env or []}
    for name, value in values.items():
        merged[name] = client.V1EnvVar(name=name, value=value)
    return list(merged.values())


def with_secrets(env: list[client.V1EnvVar], spec: AppSpec) -> list[client.V1EnvVar]:
    """`env` with a variable per secret the spec names, read by the kubelet from the app's
    Secret (`secretKeyRef`, not optional): the pod spec, and whoever builds it, never
    holds a value. A template's variable of the same name is replaced in place."""
    merged = {e.name: e for e in env}
    for name in spec.secrets:
        ref = client.V1SecretKeySelector(name=app_secrets_name(spec.name), key=name)
        merged[name] = client.V1EnvVar(
            name=name, value_from=client.V1EnvVarSource(secret_key_ref=ref)
        )
    return list(merged.values())


def resources(spec: AppSpec) -> client.V1ResourceRequirements:
    """The app's `resources`, as requests and as limits."""
    amounts = {"cpu": spec.resources.cpu, "memory": spec.resources.memory}
    return client.V1ResourceRequirements(requests=dict(amounts), limits=dict(amounts))


def image(spec: AppSpec) -> str:
    """The app's image.

    Raises:
        ValueError: the spec has none.
    """
    if not spec.image:
        raise ValueError(f"app {spec.name} has no image: the Kubernetes backend needs `image`")
    return spec.image
