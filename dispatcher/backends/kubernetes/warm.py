"""Warm runners on Kubernetes: bare pods that wait for one run each, and their hand-over.

A job app with `pool.size` keeps that many pods (`objects.make_warm_pod`)
running `podrunner.py` in the app's image, each waiting on
`warm_runner_port` at its pod IP. `start` creates one (the refill path: one
create) and waits for the Pod informer to see it ready. A run's start is the
hot path and creates nothing: `claim` checks the pod in the informer's cache
(a GET when the cache does not have it), `hand` relabels it in one PATCH
(`spinyard.io/instance` becomes the job id, `spinyard.io/pooled=false`, and
activeDeadlineSeconds is set so Kubernetes stops the run at its deadline as it
does a Job's) and POSTs the launch to the pod, over the pod network, with the
pod's own bearer token. From then on the pod is the run's: the run reports
(`job_reports.py`) read its phase as a Job's conditions, a cancel deletes it,
its log is the container's. The pod ends with the run and is deleted once
its end is reported (`clear`); the pool refills.

A hand-over that fails (the pod is gone, ended, of another image, or did
not take the launch) undoes the relabel and deletes the pod, and the caller
starts the run cold: a pod that may have started the run is stopped before
the cold Job is created.
"""

import asyncio
import contextlib
import math
import secrets
import time
from pathlib import Path

import aiohttp

from dispatcher.backends.base import JobLaunch, http_host
from dispatcher.backends.kubernetes import objects, podrunner, status
from dispatcher.backends.kubernetes.api import ApiError, KubeApi
from dispatcher.backends.kubernetes.informer import Informer
from dispatcher.backends.kubernetes.logtail import PodLogs
from dispatcher.backends.kubernetes.resources import PODS
from dispatcher.backends.launch import check_id, check_job_id
from dispatcher.backends.settings import KubernetesBackendSettings
from dispatcher.logs import get as get_logger
from handlers.errors import RetryableError, StartFailed
from handlers.ports import Instance, JobReport, WarmHandOver
from schemas import errors as codes
from schemas.events import JobUpdate
from schemas.spec import AppSpec

PROGRAM = Path(podrunner.__file__).read_text()  # what a warm pod runs, with `python -c`
TOKEN_ENV = f"{podrunner.PREFIX}TOKEN"
SELECTOR = f"{objects.SELECTOR},{objects.WARM}=true"
_LAUNCH_S = 5.0  # for the runner's answer to a launch (it writes two files, starts a process)


def claimed(pod: dict) -> bool:
    """Whether the warm pod has been handed a run (its instance label is the job id)."""
    return status.label(pod, objects.POOLED) == "false"


def ended(pod: dict) -> bool:
    """Whether the pod's container has ended (or Kubernetes failed the pod)."""
    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return True
    return status.exit_code(pod, objects.JOB_CONTAINER) is not None


def waiting(pod: dict) -> bool:
    """Whether a warm pod waits for a run: unclaimed, not being deleted, not ended."""
    return (
        not claimed(pod)
        and not (pod.get("metadata") or {}).get("deletionTimestamp")
        and not ended(pod)
    )


def run_state(pod: dict) -> str | None:
    """A claimed warm pod's run, as a Job's conditions would say it: running, succeeded,
    failed, timed_out (Kubernetes' DeadlineExceeded), or None (not running yet)."""
    phase = (pod.get("status") or {}).get("phase")
    if phase == "Succeeded":
        return "succeeded"
    if phase == "Failed":
        return (
            "timed_out"
            if (pod.get("status") or {}).get("reason") == "DeadlineExceeded"
            else "failed"
        )
    return "running" if phase == "Running" else None


def instance_of(pod: dict) -> Instance | None:
    """A warm pod as the backend lists it: kind `warm` until claimed, then its run's `job`."""
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    instance_id = labels.get(objects.INSTANCE)
    if instance_id is None:
        return None
    annotations = meta.get("annotations") or {}
    created_at = status.timestamp(annotations.get(objects.CREATED_AT))
    created_at = created_at or status.timestamp(meta.get("creationTimestamp")) or 0.0
    is_run = claimed(pod)
    return Instance(
        id=instance_id,
        app=annotations.get(objects.APP_NAME) or labels.get(objects.APP, ""),
        kind="job" if is_run else "warm",
        created_at=created_at,
        pooled=labels.get(objects.POOLED) == "true",
        alive=not meta.get("deletionTimestamp") and not ended(pod),
        labels=dict(labels),
    )


def _verdict(pod: dict | None) -> tuple[str, str]:
    """(ready | failed | gone | pending, why) of a starting warm pod."""
    if pod is None or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return status.GONE, "the warm runner's pod is gone"
    if claimed(pod):
        return status.GONE, "the warm runner has a run already"
    if status.condition(pod, "Ready").get("status") == "True":
        return status.READY, ""
    if ended(pod):
        code = status.exit_code(pod, objects.JOB_CONTAINER)
        return status.FAILED, f"the warm runner exited at start (code {code})"
    scheduled = status.condition(pod, "PodScheduled")
    if scheduled.get("status") == "False":
        return status.PENDING, f"not scheduled: {scheduled.get('message')}"
    return status.PENDING, "its launch port has not answered yet"


class WarmPods:
    """The warm runners' pods of one namespace, seen through the Pod informer."""

    def __init__(
        self, api: KubeApi, pods: Informer, settings: KubernetesBackendSettings, logs: PodLogs
    ) -> None:
        self._api, self._pods, self._settings, self._logs = api, pods, settings, logs
        self._changed = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None
        self._log = get_logger("spinyard.backend.kubernetes")
        pods.on(self._touch, self._touch, lambda _exc: self._touch({}))

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    def _touch(self, _pod: dict) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def cached(self, instance_id: str) -> dict | None:
        """The pod, if the informer runs, has listed, and has it."""
        if not self._pods.running or not self._pods.synced.is_set():
            return None
        return self._pods.cache.get(objects.object_name(instance_id))

    async def pod(self, instance_id: str) -> dict | None:
        """The pod, from the informer's cache if it has it, else from the API."""
        found = self.cached(instance_id)
        if found is None:
            found = await self._api.get(PODS, objects.object_name(instance_id))
        return found if found is not None and status.label(found, objects.WARM) == "true" else None

    async def start(self, instance_id: str, spec: AppSpec, template: dict, timeout: float) -> None:  # noqa: ASYNC109
        """Create the warm pod unless it exists; return once it is ready.

        Raises:
            handlers.errors.StartFailed: no image; the runner exited, or the pod went;
                not ready within `timeout` (`start_timeout`); with its log's tail.
        """
        try:
            await self._start(instance_id, spec, template, timeout)
        except StartFailed as exc:
            pod = self._pods.cache.get(objects.object_name(instance_id))
            exc.log_tail = exc.log_tail or await self._logs.tail(pod, objects.JOB_CONTAINER) or None
            raise

    async def _start(self, instance_id: str, spec: AppSpec, template: dict, timeout: float) -> None:  # noqa: ASYNC109
        check_id(instance_id)
        try:
            body = objects.make_warm_pod(
                spec,
                instance_id,
                template=template,
                created_at=time.time(),
                program=PROGRAM,
                port=self._settings.warm_runner_port,
                token=secrets.token_urlsafe(24),
                image_pull_policy=self._settings.image_pull_policy,
            )
        except ValueError as exc:
            raise StartFailed(str(exc), code=codes.START_FAILED) from exc
        created = await self._api.create(PODS, body)
        self._pods.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout(timeout):
                await self._pods.until_synced()
        except TimeoutError:
            message = f"the warm runner was not ready within {max(1, round(timeout))} s"
            raise StartFailed(
                f"{message}: the pod watch did not answer", code=codes.START_TIMEOUT
            ) from None
        if created is not None:
            self._log.info("warm_pod_created", instance=instance_id, app=spec.name)
        found = created or await self._api.get(PODS, objects.object_name(instance_id))
        if found is not None and objects.object_name(instance_id) not in self._pods.cache:
            self._pods.note(found)  # the watch may not have brought it yet
        while True:
            changed = self._changed
            pod = self._pods.cache.get(objects.object_name(instance_id))
            verdict, why = _verdict(pod)
            if verdict == status.READY:
                return
            remaining = deadline - loop.time()
            if verdict in (status.FAILED, status.GONE):
                raise StartFailed(why, code=codes.START_FAILED)
            if remaining <= 0:
                message = f"the warm runner was not ready within {max(1, round(timeout))} s: {why}"
                raise StartFailed(message, code=codes.START_TIMEOUT)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()

    async def claim(self, instance_id: str) -> bool | None:
        """Whether the warm pod waits for a run; None if `instance_id` is no warm pod."""
        pod = await self.pod(instance_id)
        if pod is None:
            return None
        return waiting(pod)

    async def hand(self, launch: JobLaunch, spec: AppSpec, instance_id: str) -> WarmHandOver | None:
        """Relabel the warm pod as the run's and hand it the launch (one PATCH, one POST to
        the pod): "running", as the pod's runner answers once it has started the model;
        None if it did not take it (then it is deleted, and the run is the caller's to
        start cold)."""
        check_id(instance_id)
        check_job_id(launch.job_id)
        self._pods.start()  # run_start's own cache, so the next claim needs no GET
        pod = await self.pod(instance_id)
        if pod is None or not waiting(pod) or _image(pod) != spec.image:
            if pod is not None:
                await self.stop(instance_id, pod)  # ended, or of an older image
            return None
        started = status.timestamp((pod.get("status") or {}).get("startTime")) or time.time()
        deadline = math.ceil(max(0.0, time.time() - started) + launch.deadline_s)
        patch = {
            "metadata": {"labels": {objects.INSTANCE: launch.job_id, objects.POOLED: "false"}},
            "spec": {"activeDeadlineSeconds": max(1, deadline)},
        }
        name = objects.object_name(instance_id)
        pod = await self._api.patch(PODS, name, patch)
        if pod is None:
            return None
        self._pods.note(pod)
        if await self._launch(pod, objects.warm_launch(launch, spec)):
            self._log.info("warm_pod_launched", instance=instance_id, job_id=launch.job_id)
            return "running"
        undo = {"metadata": {"labels": {objects.INSTANCE: instance_id, objects.POOLED: "true"}}}
        with contextlib.suppress(ApiError, RetryableError):
            await self._api.patch(PODS, name, undo)
        await self._api.delete(PODS, name)
        self._log.warning("warm_pod_launch_failed", instance=instance_id, job_id=launch.job_id)
        return None

    async def _launch(self, pod: dict, body: dict) -> bool:
        """POST the launch to the pod's runner; whether it took it."""
        address = (pod.get("status") or {}).get("podIP")
        if not address:
            return False
        url = f"http://{http_host(address)}:{self._settings.warm_runner_port}/launch"
        headers = {"Authorization": f"Bearer {_token(pod)}"}
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=_LAUNCH_S))
        try:
            async with self._http.post(url, json=body, headers=headers) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._log.warning("warm_pod_unreachable", pod=pod["metadata"]["name"], error=repr(exc))
            return False

    async def stop(self, instance_id: str, pod: dict | None = None) -> bool:
        """Delete a warm pod that has no run (one that has is its run's: cancel it)."""
        pod = pod or await self.pod(instance_id)
        if pod is None or claimed(pod):
            return False
        return await self._api.delete(PODS, objects.object_name(instance_id))

    def clearing(self, report: JobReport) -> JobReport:
        """`report`, then `clear` of the run it reported."""

        async def report_then_clear(update: JobUpdate) -> None:
            await report(update)
            await self.clear(update.job_id, update.state)

        return report_then_clear

    async def clear(self, job_id: str, state: str) -> None:
        """Delete the ended warm pods of a run whose end (`state`) has been reported: its log
        tail is in the report, and a pod per run kept for days would fill the namespace
        (a cold run's Job goes after `job_ttl_s`). Best effort: a later report tries again."""
        if state not in ("succeeded", "failed", "timed_out"):
            return
        for pod in list(self._pods.cache.values()):
            if _runs(pod, job_id) and ended(pod):
                with contextlib.suppress(ApiError, RetryableError):
                    await self._api.delete(PODS, pod["metadata"]["name"])

    async def of_run(self, job_id: str) -> list[dict]:
        """The pods that run `job_id` (from the cache, else one LIST)."""
        if self._pods.running and self._pods.synced.is_set():
            found = [p for p in self._pods.cache.values() if _runs(p, job_id)]
        else:
            found, _ = await self._api.list(PODS, f"{SELECTOR},{objects.INSTANCE}={job_id}")
        return [p for p in found if _runs(p, job_id)]

    async def resume(self, launch: JobLaunch, spec: AppSpec) -> bool:
        """Whether a warm pod has the run already (a redelivered start); if so, its launch is
        sent again, so a start that stopped between the relabel and the launch (its replica
        died) still runs. The runner takes the same launch twice as once. If the pod does
        not answer it is left alone, not replaced by a cold Job: it may be running the run
        (its deadline stops it if not)."""
        pods = await self.of_run(launch.job_id)
        for pod in pods:
            if ended(pod) or await self._launch(pod, objects.warm_launch(launch, spec)):
                return True
            self._log.warning(
                "warm_pod_resume_unanswered", pod=pod["metadata"]["name"], job_id=launch.job_id
            )
        return bool(pods)

    async def listed(self) -> list[Instance]:
        """Every warm pod, claimed or not: one LIST."""
        pods, _ = await self._api.list(PODS, SELECTOR)
        return [i for i in map(instance_of, pods) if i is not None]


def _runs(pod: dict, job_id: str) -> bool:
    return (
        status.label(pod, objects.WARM) == "true"
        and claimed(pod)
        and status.label(pod, objects.INSTANCE) == job_id
    )


def _image(pod: dict) -> str | None:
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") == objects.JOB_CONTAINER:
            return container.get("image")
    return None


def _token(pod: dict) -> str:
    for container in (pod.get("spec") or {}).get("containers") or []:
        for env in container.get("env") or []:
            if env.get("name") == TOKEN_ENV:
                return env.get("value") or ""
    return ""
