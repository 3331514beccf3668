"""What the objects the Kubernetes API returns say, read by pure functions.

The backend's watches and lists hand over plain dicts; these functions turn
them into answers: is a viz instance ready, failed, gone or still starting
(and why), what state a run is in, which `Instance` an object is, when a pod
was scheduled, started and ready. Nothing here calls the API.
"""

import time
from collections.abc import Iterable

from dispatcher.backends.kubernetes import objects
from handlers.ports import Instance

# Container states that will not get better by waiting.
_STUCK = {
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
}
READY, FAILED, GONE, PENDING = "ready", "failed", "gone", "pending"


def label(obj: dict, key: str) -> str | None:
    """The value of label `key` of `obj`, if it has it."""
    return ((obj.get("metadata") or {}).get("labels") or {}).get(key)


def ours(obj: dict) -> bool:
    """Whether spinyard made `obj` (its managed-by label)."""
    return label(obj, objects.MANAGED_BY) == objects.MANAGER


def condition(obj: dict, kind: str) -> dict:
    """The status condition of type `kind` (`{}` if there is none)."""
    for found in (obj.get("status") or {}).get("conditions") or []:
        if found.get("type") == kind:
            return found
    return {}


def timestamp(text: str | None) -> float | None:
    """Unix time of an RFC 3339 timestamp; None if there is none or it is not one."""
    try:
        return objects.parse_rfc3339(text) if text else None
    except ValueError:
        return None


def instance_of(obj: dict, kind: str) -> Instance | None:
    """The `Instance` a Deployment (`viz`) or Job (`job`) is; None if it is not one of ours.

    A Deployment is alive unless it is being deleted or Kubernetes gave up
    on it (no ready pod within its progress deadline); a Job while it has
    neither completed nor failed.
    """
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    instance_id = labels.get(objects.INSTANCE)
    if instance_id is None or labels.get(objects.COMPONENT) != kind:
        return None
    created_at = timestamp(annotations.get(objects.CREATED_AT))
    created_at = created_at or timestamp(meta.get("creationTimestamp")) or 0.0
    if kind == "viz":
        progress = condition(obj, "Progressing")
        given_up = progress.get("status") == "False" and (
            progress.get("reason") == "ProgressDeadlineExceeded"
        )
        alive = not meta.get("deletionTimestamp") and not given_up
    else:
        alive = not meta.get("deletionTimestamp") and job_state(obj, {}) in (None, "running")
    return Instance(
        id=instance_id,
        app=annotations.get(objects.APP_NAME) or labels.get(objects.APP, ""),
        kind=kind,
        created_at=created_at,
        pooled=labels.get(objects.POOLED) == "true",
        alive=alive,
        labels=dict(labels),
    )


def container_status(pod: dict, container: str) -> dict | None:
    """The status of the pod's container named `container`, if reported."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == container:
            return status
    return None


def ran(pod: dict, container: str) -> bool:
    """Whether the container has run (runs, ended, or restarted): its probe had a chance."""
    found = container_status(pod, container) or {}
    state = found.get("state") or {}
    return bool(found.get("restartCount")) or "running" in state or "terminated" in state


def exit_code(pod: dict, container: str) -> int | None:
    """The exit code of the container's last run, if it has ended."""
    status = container_status(pod, container) or {}
    for state in (status.get("state"), status.get("lastState")):
        terminated = (state or {}).get("terminated")
        if terminated and terminated.get("exitCode") is not None:
            return int(terminated["exitCode"])
    return None


def note_phases(phases: dict[str, float], pod: dict) -> None:
    """Remember when the pod was first seen scheduled, started and ready."""
    now = time.time()
    scheduled = condition(pod, "PodScheduled")
    if "scheduled" not in phases and scheduled.get("status") == "True":
        phases["scheduled"] = timestamp(scheduled.get("lastTransitionTime")) or now
    running = ((container_status(pod, objects.VIZ_CONTAINER) or {}).get("state") or {}).get(
        "running"
    )
    if "started" not in phases and running is not None:
        phases["started"] = timestamp(running.get("startedAt")) or now
    ready = condition(pod, "Ready")
    if "ready" not in phases and ready.get("status") == "True":
        phases["ready"] = timestamp(ready.get("lastTransitionTime")) or now


def viz_verdict(deployment: dict | None, pods: Iterable[dict]) -> tuple[str, str, dict | None]:
    """(ready | failed | gone | pending, why, the pod whose log tells more) of a viz instance.

    Pending names the newest pod, whose log a start that times out shows.

    Ready when a pod passes its readiness probe; failed when its container
    exited or cannot start, the pod failed, or Kubernetes gave up (progress
    deadline); gone when the Deployment is not there or is being deleted.
    """
    if deployment is None:
        return GONE, "the app's instance is not running", None
    if (deployment.get("metadata") or {}).get("deletionTimestamp"):
        return GONE, "the app's instance was stopped before it was ready", None
    pods = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    if any(condition(p, "Ready").get("status") == "True" for p in pods):
        return READY, "", None
    if ((deployment.get("status") or {}).get("readyReplicas") or 0) >= 1:
        return READY, "", None
    for pod in pods:
        why = _pod_failure(pod)
        if why:
            return FAILED, why, pod
    progress = condition(deployment, "Progressing")
    if progress.get("status") == "False" and progress.get("reason") == "ProgressDeadlineExceeded":
        return FAILED, f"Kubernetes gave up starting the app: {progress.get('message')}", None
    return PENDING, _pending(pods), pods[-1] if pods else None


def _pod_failure(pod: dict) -> str | None:
    """Why the pod will not become ready by waiting, if it will not."""
    status = pod.get("status") or {}
    if status.get("phase") == "Failed":
        return f"the app's pod failed: {status.get('reason')}: {status.get('message')}"
    container = container_status(pod, objects.VIZ_CONTAINER) or {}
    state = container.get("state") or {}
    terminated = state.get("terminated")
    if not terminated and container.get("restartCount"):  # it crashed and is being restarted
        terminated = (container.get("lastState") or {}).get("terminated")
    if terminated:
        reason = terminated.get("reason")
        how = f" ({reason})" if reason and reason not in ("Error", "Completed") else ""
        return f"the app exited with code {terminated.get('exitCode')}{how} before it was ready"
    waiting = state.get("waiting") or {}
    if waiting.get("reason") in _STUCK:
        return f"the app's container could not start: {waiting['reason']}: {waiting.get('message')}"
    return None


def _pending(pods: list[dict]) -> str:
    """What a starting instance waits for, for the timeout message."""
    if not pods:
        return "no pod yet"
    pod = pods[-1]
    scheduled = condition(pod, "PodScheduled")
    if scheduled.get("status") == "False":
        return f"not scheduled: {scheduled.get('message') or scheduled.get('reason')}"
    state = (container_status(pod, objects.VIZ_CONTAINER) or {}).get("state") or {}
    if "waiting" in state:
        return f"container waiting: {state['waiting'].get('reason')}"
    if "running" in state:
        return "it runs, but its readiness probe has not passed (the pod's Events hold its answers)"
    return "pod pending"


def job_state(job: dict, pods: dict[str, dict]) -> str | None:
    """What a run's Job and pods say: running, succeeded, failed, timed_out, or None (queued)."""
    for found in (job.get("status") or {}).get("conditions") or []:
        if found.get("status") != "True":
            continue
        if found.get("type") == "Complete":
            return "succeeded"
        if found.get("type") == "Failed":
            return "timed_out" if found.get("reason") == "DeadlineExceeded" else "failed"
    if (job.get("status") or {}).get("ready") or any(
        (p.get("status") or {}).get("phase") in ("Running", "Succeeded", "Failed")
        for p in pods.values()
    ):
        return "running"
    return None
