"""Run reports from what the Job and Pod informers see: running, then how the run ended.

A run's state is computed from its Job and pods when a change to either is
taken from the queue, not from each event: a run whose Job completed before
its `running` change was taken is reported `succeeded` only. Reports are
states, not transitions: they may repeat or skip `running`, and the
`job_update` handler moves a run forward from whatever it last recorded. A
Job deleted before it ended is reported `cancelled`.

A run handed to a warm runner has no Job: its pod (`warm.py`), labelled
with the job id once claimed, says its state (`warm.run_state`), and one
deleted before it ended was cancelled. Where a run has a Job too (started
cold after a hand-over failed), the Job's word counts.
"""

import asyncio
from collections.abc import Awaitable, Callable

from dispatcher import logs
from dispatcher.backends.kubernetes import informer, objects, status, warm
from dispatcher.backends.kubernetes.informer import Informer
from handlers.ports import JobReport
from schemas.events import JobUpdate

Describe = Callable[[str, str, list[dict]], Awaitable[JobUpdate]]
ENDED = ("succeeded", "failed", "timed_out", "cancelled")
_RETRY_REPORT_S = 1.0


class JobReports:
    """Runs by job id, as the Job and Pod informers report them; `watch` turns them into reports."""

    def __init__(self, jobs: Informer, pods: Informer) -> None:
        self._informers = (jobs, pods)
        self._jobs: dict[str, dict] = {}
        self._pods: dict[str, dict[str, dict]] = {}  # job id -> pod name -> pod
        self._runs_of: dict[str, str] = {}  # pod name -> job id (a warm pod's label changes)
        self._changes: asyncio.Queue[str] | None = None  # while `watch` runs
        self._gone: dict[str, dict] = {}  # deleted Jobs' last state, while `watch` runs
        self._log = logs.get("spinyard.backend.kubernetes")
        jobs.on(self._on_job, self._job_gone)
        pods.on(self._on_pod, self._pod_gone)

    def pods(self, job_id: str) -> list[dict]:
        """The run's pods the informer has seen."""
        return list(self._pods.get(job_id, {}).values())

    async def watch(self, report: JobReport, stopping: asyncio.Event, describe: Describe) -> None:
        """Report each run's state as it changes, until `stopping`.

        Every run present at the start is reported again (reports are
        de-duplicated downstream). A report that fails is tried again a second later.

        Args:
            report: publishes one update.
            stopping: set to stop.
            describe: makes the update of (job id, state, its pods): exit code, log tail.
        """
        reported: dict[str, str] = {}
        changes = self._changes = asyncio.Queue()
        stop = asyncio.create_task(stopping.wait(), name="k8s-watch-jobs-stop")
        try:
            synced = asyncio.create_task(
                informer.synced(*self._informers), name="k8s-watch-jobs-sync"
            )
            await asyncio.wait({synced, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not synced.done():  # stopped before the API answered
                synced.cancel()
                return
            synced.result()
            for job_id in self._jobs:
                changes.put_nowait(job_id)
            while not stopping.is_set():
                get = asyncio.create_task(changes.get(), name="k8s-watch-jobs-next")
                await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    break
                job_id = get.result()
                state = self._state(job_id, reported.get(job_id))
                if state is None or reported.get(job_id) == state:
                    continue
                update = await describe(job_id, state, self.pods(job_id))
                try:
                    await report(update)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._log.warning("job_report_failed", job_id=job_id, error=repr(exc))
                    asyncio.get_running_loop().call_later(
                        _RETRY_REPORT_S, changes.put_nowait, job_id
                    )
                    continue
                reported[job_id] = state
        finally:
            stop.cancel()
            self._changes = None
            self._gone.clear()

    def _state(self, job_id: str, reported: str | None) -> str | None:
        """The state to report for a run; None: nothing (new) to say."""
        job = self._jobs.get(job_id)
        pods = self._pods.get(job_id, {})
        if job is not None:
            return status.job_state(job, pods)
        runners = [p for p in pods.values() if status.label(p, objects.WARM) == "true"]
        if runners:
            return warm.run_state(runners[-1])
        last = self._gone.pop(job_id, None)
        if last is None or reported in ENDED:
            return None
        if status.label(last, objects.WARM) == "true":
            ended = warm.run_state(last)
        else:
            ended = status.job_state(last, pods)
        return "cancelled" if ended in (None, "running") else None

    def _changed(self, job_id: str) -> None:
        if self._changes is not None:
            self._changes.put_nowait(job_id)

    def _on_job(self, job: dict) -> None:
        job_id = status.label(job, objects.INSTANCE)
        if job_id is not None:
            self._jobs[job_id] = job
            self._changed(job_id)

    def _job_gone(self, job: dict) -> None:
        job_id = status.label(job, objects.INSTANCE)
        if job_id is None:
            return
        self._jobs.pop(job_id, None)
        if self._changes is not None:
            self._gone[job_id] = job
            self._changes.put_nowait(job_id)

    def _on_pod(self, pod: dict) -> None:
        found = _job_pod(pod)
        name = (pod.get("metadata") or {}).get("name")
        before = self._runs_of.get(name) if name else None
        if before is not None and (found is None or found[0] != before):
            self._forget_pod(before, name)  # a warm pod given back (its hand-over failed)
        if found is not None:
            job_id, name = found
            self._pods.setdefault(job_id, {})[name] = pod
            self._runs_of[name] = job_id
            self._changed(job_id)

    def _pod_gone(self, pod: dict) -> None:
        found = _job_pod(pod)
        if found is not None:
            job_id, name = found
            self._forget_pod(job_id, name)
            if (
                self._changes is not None
                and job_id not in self._jobs
                and status.label(pod, objects.WARM) == "true"
            ):
                self._gone[job_id] = pod  # a warm run's pod: deleted before it ended, cancelled
            self._changed(job_id)

    def _forget_pod(self, job_id: str, name: str) -> None:
        self._runs_of.pop(name, None)
        pods = self._pods.get(job_id, {})
        pods.pop(name, None)
        if not pods:
            self._pods.pop(job_id, None)


def _job_pod(pod: dict) -> tuple[str, str] | None:
    """(job id, pod name) of a run's pod; None for a viz pod, a warm pod with no run yet,
    or a stranger."""
    owner = status.label(pod, objects.INSTANCE)
    name = (pod.get("metadata") or {}).get("name")
    if owner is None or name is None or status.label(pod, objects.COMPONENT) != "job":
        return None
    if status.label(pod, objects.WARM) == "true" and not warm.claimed(pod):
        return None
    return owner, name
