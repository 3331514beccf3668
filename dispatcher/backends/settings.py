"""The backend's settings (`SPINYARD_BACKEND__*`): which backend runs apps and jobs, and each
one's own part. `dispatcher.settings.Settings` holds them as `backend`; docs/configuration.md
lists every field with its default.
"""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field


class LocalBackendSettings(BaseModel):
    host: str = Field("127.0.0.1", description="Address app processes bind to")
    stop_grace_s: float = Field(5.0, ge=0, description="SIGTERM, then SIGKILL after this")
    probe_interval_s: float = Field(
        0.05, gt=0, description="Longest pause between readiness probes (they start at 5 ms)"
    )
    python: str | None = Field(
        None, description="Interpreter for '{python}' in commands; default: ours"
    )
    run_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="Niceness added to runs (job runners, the models they start, and warm "
        "runners once they have answered their hand-over) and to their sessions where the "
        "kernel schedules sessions as groups (autogroup), so a machine busy with runs still "
        "serves events and apps first (0: none)",
    )
    warm_fork_max_age_s: float = Field(
        300.0,
        ge=0,
        description="A new warm runner is forked from a waiting one of the same app, revision, "
        "command and environment whose first interpreter started less than this long ago "
        "(a fork, not an interpreter start and the preloads' imports); older ones are not "
        "forked from, so code changed on disk under an unchanged spec is picked up within "
        "this age (0: every warm runner starts its own interpreter)",
    )

    state_dir: Path | None = Field(
        None,
        description="Directory for the state of the processes the local backend runs (instance "
        "files, warm runners, run directories with their logs and SPINYARD_OUTPUT_DIR, the job "
        "watcher's socket); default <data_dir>/local. On tmpfs (e.g. /dev/shm/spinyard) starts "
        "touch no disk: a warm burst ran at about twice the rate on the bench machine. It "
        "must be a directory of this user that no one else may write to; runs' outputs "
        "written there then take memory",
    )


class KubernetesBackendSettings(BaseModel):
    namespace: str = Field(
        "spinyard-apps", description="Namespace viz apps and Jobs are created in (the Role's)"
    )
    kubeconfig: Path | None = Field(
        None,
        description="kubeconfig file, used only outside a cluster; default: $KUBECONFIG "
        "or ~/.kube/config",
    )
    context: str | None = Field(
        None, description="kubeconfig context, outside a cluster; default: the current one"
    )
    route_kind: Literal["ingressroute", "ingress"] = Field(
        "ingressroute",
        description="How viz instances are routed: a Traefik IngressRoute (traefik.io/v1alpha1) "
        "or a networking.k8s.io/v1 Ingress",
    )
    ingress_class: str | None = Field(
        "traefik", description="ingressClassName of Ingress routes; unset: the cluster default"
    )
    host: str | None = Field(
        None,
        description="Host name routes match; unset: any host. '{owner}', '{title}' and "
        "'{instance}' give each app or instance a host (and origin) of its own, "
        "e.g. '{title}-{owner}.apps.example.com'",
    )
    public_base_url: str | None = Field(
        None,
        description="Base URL browsers reach routes at, without the path (same placeholders as "
        "`host`); default: the gateway's public URL",
    )
    pod_templates_dir: Path = Field(
        Path("/etc/spinyard/pod-templates"),
        description="Directory with viz.yaml and job.yaml pod templates; a missing file means "
        "the built-in template (the same as k8s/base/pod-templates)",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(
        None, description="imagePullPolicy of app containers; unset: Kubernetes' default"
    )
    job_backoff_limit: int = Field(
        0, ge=0, description="Pod retries of a run's Job before it counts as failed (count)"
    )
    job_ttl_s: int = Field(
        24 * 3600,
        ge=0,
        description="Seconds a finished Job (and its inputs Secret) is kept before Kubernetes "
        "deletes it (ttlSecondsAfterFinished); the reaper usually removes it first",
    )
    log_tail_lines: int = Field(
        20, ge=0, le=1000, description="Log lines of a failed pod shown in errors (count)"
    )
    warm_runner_port: int = Field(
        8787,
        ge=1024,
        le=65535,
        description="Port a job app's warm runner pod waits on for its run (on its pod IP); "
        "the NetworkPolicy `warm-runner-ingress` opens it to run_start only",
    )
    events_timeout_s: float = Field(
        2.0,
        ge=0,
        description="Longest wait for a failed start's pod Events (one list, not retried), "
        "read for the readiness probe's last answer, seconds; 0: not read",
    )
    api_timeout_s: float = Field(
        10.0, gt=0, description="Connect and read timeout of one API request, seconds"
    )
    api_tries: int = Field(
        4, ge=1, le=20, description="Attempts per API call on 429, 5xx and timeouts (count)"
    )
    api_backoff_s: float = Field(
        0.2, gt=0, description="Delay before the first retry, seconds; doubles with each retry"
    )
    api_backoff_max_s: float = Field(
        5.0, gt=0, description="Longest delay between retries (also caps Retry-After), seconds"
    )
    list_page_size: int = Field(
        500, ge=1, description="Objects per page of a LIST (limit/continue), count"
    )
    watch_timeout_s: int = Field(
        300,
        ge=1,
        description="A watch request ends after this many seconds and is resumed from its "
        "last resourceVersion (timeoutSeconds)",
    )


class BackendSettings(BaseModel):
    kind: Literal["local", "kubernetes"] = Field("local", description="Where apps and jobs run")
    local: LocalBackendSettings = Field(default_factory=LocalBackendSettings)
    kubernetes: KubernetesBackendSettings = Field(default_factory=KubernetesBackendSettings)
