"""What a failed pod says about itself: the end of its log, its exit code, its probe's answer.

Start failures (viz instances, warm runners) and failed runs carry the
end of the pod's log (`log_tail`); a failed run also its exit code
(`job_update`); a viz start that failed also the readiness probe's last
answer, which kubelet reports only as an Event (probes.py). All are best
effort: what cannot be read is left out, never an error.
"""

import contextlib

from dispatcher import logs
from dispatcher.backends.kubernetes import objects, probes, status
from dispatcher.backends.kubernetes.api import ApiError, KubeApi
from dispatcher.backends.kubernetes.resources import PODS
from handlers.errors import RetryableError
from schemas.events import JobUpdate

TAIL_BYTES = 4096  # of a pod's log tail, at most (its lines may be long)


class PodLogs:
    """Reads pods' log tails and probe answers through the API."""

    def __init__(self, api: KubeApi, lines: int) -> None:
        self._api, self._lines = api, lines
        self._log = logs.get("spinyard.backend.kubernetes")

    async def probe_answer(self, pod: dict | None, limit_s: float) -> str | None:
        """The readiness probe's last answer to the app, if it ran; from the pod's Events."""
        if pod is None or not status.ran(pod, objects.VIZ_CONTAINER):
            return None
        return await probes.last_answer(self._api, pod, objects.VIZ_CONTAINER, limit_s)

    async def tail(self, pod: dict | None, container: str = objects.VIZ_CONTAINER) -> str:
        """The end of a pod's log ('' if there is none or it cannot be read)."""
        lines = self._lines
        if pod is None or not lines:
            return ""
        found = status.container_status(pod, container) or {}
        previous = bool(found.get("restartCount")) and "terminated" not in (
            found.get("state") or {}
        )
        name = pod["metadata"]["name"]
        try:
            text = (await self._api.pod_log(name, container, lines, previous)).strip()
        except (ApiError, RetryableError) as exc:
            self._log.warning("pod_log_unreadable", pod=name, error=str(exc))
            return ""
        return "\n".join(text.splitlines()[-lines:])[-TAIL_BYTES:]

    async def job_update(self, job_id: str, state: str, pods: list[dict]) -> JobUpdate:
        """The report of a run in `state`: for a failure, its exit code and log tail (of its
        newest pod: a Job's, or the warm runner's that ran it)."""
        if state not in ("failed", "timed_out"):
            code = 0 if state == "succeeded" else None
            return JobUpdate(job_id=job_id, state=state, exit_code=code)
        if not any(status.exit_code(p, objects.JOB_CONTAINER) is not None for p in pods):
            selector = f"{objects.SELECTOR},{objects.INSTANCE}={job_id}"
            with contextlib.suppress(ApiError, RetryableError):
                pods, _ = await self._api.list(PODS, selector)
        pods = sorted(pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
        pod = pods[-1] if pods else None
        code = status.exit_code(pod, objects.JOB_CONTAINER) if pod else None
        tail = await self.tail(pod, objects.JOB_CONTAINER)
        return JobUpdate(job_id=job_id, state=state, exit_code=code, log_tail=tail or None)
