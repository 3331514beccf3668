"""The Kubernetes objects spinyard creates, built by pure functions; the backend builds with this.

A viz instance is a Deployment (one replica, here), a ClusterIP Service and
a route (`routes.py`). A run is a batch/v1 Job and a Secret holding its
inputs and presigned upload URLs, owned by the Job so it goes with it. A
job app's warm runner is a bare pod of the job template (`make_warm_pod`)
that waits on a port for its run (`podrunner.py`).

What an app's container is given (placeholders filled, environment) is the
launch contract, `dispatcher.backends.launch`, shared with the local
backend; the secrets the spec names come from the app's Secret
(`secretKeyRef`), so no value is ever in a Deployment or a Job. Pods start
from the operator's templates with the security rules
enforced (`pods.py`); names, labels and annotations are `meta.py`'s. This
module also offers the public names of those three, so the backend and
`status.py` import only it. Nothing here talks to the API; `backend.py`
does, through `api.py`.
"""

import json
import math

from kubernetes import client

from dispatcher.backends.base import JobLaunch, instance_prefix
from dispatcher.backends.kubernetes import pods
from dispatcher.backends.kubernetes.meta import (
    APP,
    APP_NAME,
    COMPONENT,
    CREATED_AT,
    INSTANCE,
    MANAGED_BY,
    MANAGER,
    POOLED,
    SELECTOR,
    WARM,
    app_label,
    app_secrets_name,
    labels,
    metadata,
    object_name,
    owner_reference,
    parse_rfc3339,
    rfc3339,
    secret_name,
)
from dispatcher.backends.kubernetes.podrunner import PREFIX as RUNNER_PREFIX
from dispatcher.backends.kubernetes.pods import DEFAULT_TEMPLATES, JOB_CONTAINER, VIZ_CONTAINER
from dispatcher.backends.kubernetes.routes import (
    HTTP_PORT,
    Routing,
    make_ingress,
    make_ingressroute,
    make_route,
    make_service,
    public_url,
    route_host,
)
from dispatcher.backends.launch import argv, fill, job_env, job_values, viz_env, viz_values
from schemas.spec import AppSpec

__all__ = [
    "APP",
    "APP_NAME",
    "COMPONENT",
    "CREATED_AT",
    "DEFAULT_TEMPLATES",
    "HTTP_PORT",
    "INSTANCE",
    "JOB_CONTAINER",
    "MANAGED_BY",
    "MANAGER",
    "POOLED",
    "SELECTOR",
    "VIZ_CONTAINER",
    "WARM",
    "Routing",
    "app_label",
    "app_secrets_name",
    "labels",
    "make_ingress",
    "make_ingressroute",
    "make_job",
    "make_job_secret",
    "make_route",
    "make_service",
    "make_viz_deployment",
    "make_warm_pod",
    "object_name",
    "owner_reference",
    "parse_rfc3339",
    "public_url",
    "rfc3339",
    "route_host",
    "secret_name",
]

RUN_DIR = "/var/run/spinyard"
OUTPUT_DIR = "/tmp/outputs"
INPUTS_FILE, UPLOADS_FILE = "inputs.json", "uploads.json"
READINESS_PERIOD_S = 1  # cold starts wait on the first passing probe: keep it short
VIZ_HOST, PYTHON = "0.0.0.0", "python"  # what {host} and {python} are in a container


# -- viz instances --


def _readiness(path: str, port: str, failures: int) -> client.V1Probe:
    """An HTTP GET readiness probe of `path` on the named `port`, every READINESS_PERIOD_S."""
    return client.V1Probe(
        http_get=client.V1HTTPGetAction(path=path, port=port),
        period_seconds=READINESS_PERIOD_S,
        timeout_seconds=2,
        failure_threshold=failures,
    )


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

    The command and environment are the launch contract's (`launch.viz_env`),
    with `{port}` the spec's `port`, `{host}` 0.0.0.0 and `{python}` python;
    the template's own variables stay unless those replace them. The readiness probe
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
    values = viz_values(port=spec.port, prefix=prefix, host=VIZ_HOST, python=PYTHON)
    select = {MANAGED_BY: MANAGER, INSTANCE: instance_id}
    pod, container = pods.pod_template(
        template, "viz", VIZ_CONTAINER, labels(spec.name, instance_id, "viz")
    )
    container.image = pods.image(spec)
    container.image_pull_policy = image_pull_policy
    container.command = argv(spec, values)
    container.args = None
    env = pods.merge_env(container, viz_env(spec, instance_id, values))
    container.env = pods.with_secrets(env, spec)
    container.ports = [client.V1ContainerPort(name="http", container_port=spec.port)]
    container.resources = pods.resources(spec)
    container.readiness_probe = _readiness(prefix.rstrip("/") + spec.readiness_path, "http", 3)
    return client.V1Deployment(
        api_version="apps/v1",
        kind="Deployment",
        metadata=metadata(
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
    uploads them itself with HTTP PUT. The command and environment are the
    launch contract's (`launch.job_env`), with `{python}` python and those
    paths. The run's deadline is the Job's activeDeadlineSeconds: Kubernetes stops
    it and marks it Failed with reason DeadlineExceeded.

    Raises:
        ValueError: the spec has no image.
    """
    name = object_name(launch.job_id)
    pod, container = pods.pod_template(
        template, "job", JOB_CONTAINER, labels(spec.name, launch.job_id, "job")
    )
    pod.spec.restart_policy = "Never"
    container.image = pods.image(spec)
    container.image_pull_policy = image_pull_policy
    values = job_values(python=PYTHON)
    container.command = argv(spec, values)
    container.args = None
    env = job_env(
        spec,
        launch.job_id,
        values,
        inputs=f"{RUN_DIR}/{INPUTS_FILE}",
        uploads=f"{RUN_DIR}/{UPLOADS_FILE}",
        output_dir=OUTPUT_DIR,
        deadline_s=launch.deadline_s,
    )
    container.env = pods.with_secrets(pods.merge_env(container, env), spec)
    container.resources = pods.resources(spec)
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
        metadata=metadata(name, spec.name, launch.job_id, "job", created_at),
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
        metadata=metadata(secret_name(launch.job_id), app, launch.job_id, "job", created_at, owner),
        type="Opaque",
        immutable=True,
        string_data={
            INPUTS_FILE: json.dumps(launch.inputs, sort_keys=True),
            UPLOADS_FILE: json.dumps(launch.upload_urls, sort_keys=True),
        },
    )


# -- warm runners --

RUNNER_PORT_NAME = "launch"


def make_warm_pod(
    spec: AppSpec,
    instance_id: str,
    *,
    template: dict,
    created_at: float,
    program: str,
    port: int,
    token: str,
    image_pull_policy: str | None = None,
) -> client.V1Pod:
    """A warm runner of a job app: a bare pod of the job template that waits for one run.

    Its container is the app's image running `python -c <program>` (the
    source of `podrunner.py`), listening on the pod's IP at `port` for the
    launch that carries `token`; ready once it answers /healthz. It has the
    app's `env` (filled) and resources, no run yet, and no deadline: the
    backend sets activeDeadlineSeconds when it hands over a run. Labelled
    `spinyard.io/warm-runner=true` and `spinyard.io/pooled=true`.

    Raises:
        ValueError: the spec has no image.
    """
    pod_labels = labels(spec.name, instance_id, "job") | {WARM: "true", POOLED: "true"}
    pod, container = pods.pod_template(template, "job", JOB_CONTAINER, pod_labels)
    pod.spec.restart_policy = "Never"
    container.image = pods.image(spec)
    container.image_pull_policy = image_pull_policy
    container.command = [PYTHON, "-c", program]
    container.args = None
    values = {k: fill(v, job_values(python=PYTHON)) for k, v in spec.env.items()}
    values |= {f"{RUNNER_PREFIX}PORT": str(port), f"{RUNNER_PREFIX}TOKEN": token}
    env = pods.merge_env(container, values)
    pod_ip = client.V1EnvVarSource(
        field_ref=client.V1ObjectFieldSelector(field_path="status.podIP")
    )
    env = pods.with_secrets(env, spec)  # the model gets them through the runner's environment
    container.env = [*env, client.V1EnvVar(name=f"{RUNNER_PREFIX}HOST", value_from=pod_ip)]
    container.resources = pods.resources(spec)
    container.ports = [client.V1ContainerPort(name=RUNNER_PORT_NAME, container_port=port)]
    container.readiness_probe = _readiness("/healthz", RUNNER_PORT_NAME, 1)
    return client.V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=metadata(
            object_name(instance_id),
            spec.name,
            instance_id,
            "job",
            created_at,
            extra_labels={WARM: "true", POOLED: "true"},
        ),
        spec=pod.spec,
    )


def warm_launch(launch: JobLaunch, spec: AppSpec) -> dict:
    """What a warm runner is handed for a run (`podrunner.py`): the run's inputs and upload
    URLs, the command, and the launch contract's environment (the paths the runner sets)."""
    values = job_values(python=PYTHON)
    env = job_env(
        spec,
        launch.job_id,
        values,
        inputs="",
        uploads="",
        output_dir="",
        deadline_s=launch.deadline_s,
    )
    for name in ("SPINYARD_INPUTS", "SPINYARD_UPLOADS", "SPINYARD_OUTPUT_DIR"):
        env.pop(name)
    return {
        "job_id": launch.job_id,
        "inputs": launch.inputs,
        "upload_urls": launch.upload_urls,
        "argv": argv(spec, values),
        "env": env,
        "cwd": spec.workdir,
    }
