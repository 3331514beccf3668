"""Runs viz apps as Deployments and runs as Jobs on a Kubernetes cluster.

A viz instance is a Deployment, a Service and a route (see `k8s_objects`);
a warm pool instance is the same, labelled `spinyard.io/pooled=true` until it
is claimed. A run is a Job and its inputs Secret. Everything is found again
by the managed-by label, so a restarted handler knows what runs without any
state of its own, and every operation is idempotent: a create that meets an
existing object (409) keeps it, a delete that finds nothing (404) is done.

What happens after a create is learned from watches on Deployments, Pods and
Jobs (`KubeApi.watch`: list, then watch, resumed from the last
resourceVersion or listed again), started on first need: `wait_ready` waits
for the watch to say that a pod is ready or has failed, and `watch_jobs`
turns Job and pod changes into reports. The API itself is reached only
through `k8s_api`.
"""

import asyncio
import contextlib
import functools
import time
from pathlib import Path

import yaml
from kubernetes import client

from dispatcher import logs
from dispatcher.backends.base import Backend, Instance, JobLaunch
from dispatcher.backends.kubernetes import objects, status
from dispatcher.backends.kubernetes.api import (
    DEPLOYMENTS,
    INGRESSES,
    INGRESSROUTES,
    JOBS,
    PODS,
    SECRETS,
    SERVICES,
    ApiError,
    KubeApi,
    Resource,
)
from dispatcher.settings import KubernetesBackendSettings
from handlers.errors import PermanentError, RetryableError, StartFailed
from handlers.ports import JobReport
from schemas import errors as codes
from schemas.events import JobUpdate
from schemas.names import INSTANCE_ID_RE, JOB_ID_RE
from schemas.spec import AppSpec


class _Viz:
    """What the watches said about one viz instance, and an event set on each change."""

    __slots__ = ("changed", "deployment", "phases", "pods")

    def __init__(self) -> None:
        self.deployment: dict | None = None
        self.pods: dict[str, dict] = {}
        self.phases: dict[str, float] = {}
        self.changed = asyncio.Event()

    def touch(self) -> None:
        """Wake everyone waiting on this instance; later waiters get a fresh event."""
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class KubernetesBackend(Backend):
    """Viz instances and runs as Kubernetes objects in one namespace."""

    name = "kubernetes"

    def __init__(
        self,
        settings: KubernetesBackendSettings,
        public_url: str,
        *,
        configuration: client.Configuration | None = None,
    ) -> None:
        """
        Args:
            settings: the backend's settings.
            public_url: base URL of instance links when `settings.public_base_url` is unset.
            configuration: API client configuration to use instead of loading one
                in `setup()` (tests point it at an emulator).
        """
        self._settings = settings
        self._routing = objects.Routing(
            kind=settings.route_kind,
            ingress_class=settings.ingress_class,
            host=settings.host,
            public_base_url=settings.public_base_url or public_url,
        )
        self._route = INGRESSROUTES if settings.route_kind == "ingressroute" else INGRESSES
        self.api = KubeApi(settings, configuration)
        self._templates: dict[str, dict] = {}
        self._viz: dict[str, _Viz] = {}
        self._jobs: dict[str, dict] = {}
        self._job_pods: dict[str, dict[str, dict]] = {}
        self._job_changes: asyncio.Queue[str] | None = None  # while watch_jobs runs
        self._jobs_gone: dict[str, dict] = {}  # deleted Jobs' last state, while watch_jobs runs
        self._watches: dict[Resource, asyncio.Task] = {}
        self._synced: dict[Resource, asyncio.Event] = {}
        self._errors: dict[Resource, PermanentError] = {}
        self._log = logs.get("spinyard.backend.kubernetes")

    async def setup(self) -> None:
        """Load the API configuration and the pod templates.

        Raises:
            kubernetes.config.ConfigException: no in-cluster or kubeconfig configuration.
            ValueError: a pod template is not a valid PodTemplateSpec.
        """
        await self.api.connect()
        for component in ("viz", "job"):
            self._templates[component] = await asyncio.to_thread(self._read_template, component)

    def _read_template(self, component: str) -> dict:
        path = Path(self._settings.pod_templates_dir) / f"{component}.yaml"
        try:
            template = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            self._log.info("pod_template_builtin", component=component, path=str(path))
            return objects.DEFAULT_TEMPLATES[component]
        try:
            client.V1PodTemplateSpec.from_dict(template)
        except Exception as exc:
            raise ValueError(f"{path} is not a PodTemplateSpec: {exc}") from exc
        return template

    async def cleanup(self) -> None:
        """Stop the watches and drop connections. Instances and runs keep running."""
        tasks = list(self._watches.values())
        self._watches.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.api.close()

    # -- viz instances --

    async def start_viz(self, instance_id: str, spec: AppSpec, *, pooled: bool = False) -> None:
        """Create the instance's Deployment, Service and route; those that exist are kept.

        Raises:
            ValueError: `instance_id` is not a valid id.
            handlers.errors.StartFailed: the spec cannot run here (no image) or the API
                refused the objects.
            handlers.errors.PermanentError: `forbidden`: the Role lacks a permission.
            handlers.errors.RetryableError: the API did not answer; try again later.
        """
        _check_id(instance_id)
        now = time.time()
        try:
            deployment = objects.make_viz_deployment(
                spec,
                instance_id,
                template=self._templates["viz"],
                created_at=now,
                pooled=pooled,
                image_pull_policy=self._settings.image_pull_policy,
            )
        except ValueError as exc:
            raise StartFailed(str(exc), code=codes.START_FAILED) from exc
        name = objects.object_name(instance_id)
        with _start_errors():
            found = await self.api.create(DEPLOYMENTS, deployment)
            created = found is not None
            found = found or await self.api.get(DEPLOYMENTS, name)
            if found is None or (found.get("metadata") or {}).get("deletionTimestamp"):
                raise RetryableError("the instance is still being stopped", delay=1.0)
            owner = objects.owner_reference(found)
            service = objects.make_service(spec, instance_id, created_at=now, owner=owner)
            route = objects.make_route(
                spec, instance_id, routing=self._routing, created_at=now, owner=owner
            )
            await asyncio.gather(
                self.api.create(SERVICES, service), self.api.create(self._route, route)
            )
        self._seen(found)
        if created:
            self._log.info(
                "viz_deployment_created", instance=instance_id, app=spec.name, pooled=pooled
            )

    async def wait_ready(self, instance_id: str, spec: AppSpec, timeout: float) -> None:  # noqa: ASYNC109
        """Wait for the watches to report a ready pod (its readiness probe passed).

        Raises:
            handlers.errors.StartFailed: `start_failed` if the instance does not exist,
                its container exited or cannot start (with exit code and log tail), or
                Kubernetes gave up on it; `start_timeout` after `timeout`.
            handlers.errors.PermanentError: `forbidden`: the Role does not allow watching.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        timed_out = StartFailed(
            f"the app did not answer {spec.readiness_path} within {timeout:g} s",
            code=codes.START_TIMEOUT,
        )
        try:
            async with asyncio.timeout(timeout):
                await self._watching(DEPLOYMENTS, PODS)
        except TimeoutError:
            raise timed_out from None
        entry = self._viz.get(instance_id)
        if entry is None or entry.deployment is None:
            found = await self.api.get(DEPLOYMENTS, objects.object_name(instance_id))
            if found is None or not status.ours(found):
                raise StartFailed("the app's instance is not running", code=codes.START_FAILED)
            self._on_deployment("ADDED", found)
        while True:
            for res in (DEPLOYMENTS, PODS):
                if res in self._errors:
                    raise self._errors[res]
            entry = self._viz.get(instance_id) or _Viz()
            changed = entry.changed
            verdict, message, pod = status.viz_verdict(entry.deployment, entry.pods.values())
            if verdict == status.READY:
                self._log.info("viz_instance_ready", instance=instance_id, **entry.phases)
                return
            if verdict == status.GONE:
                raise StartFailed(message, code=codes.START_FAILED)
            if verdict == status.FAILED:
                raise StartFailed(message + await self._tail(pod), code=codes.START_FAILED)
            remaining = deadline - loop.time()
            if remaining <= 0:
                detail = f" ({message})" if message else ""
                raise StartFailed(timed_out.message + detail, code=codes.START_TIMEOUT)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()

    def phases(self, instance_id: str) -> dict[str, float]:
        """Unix times at which the instance's pod was scheduled, started and ready, as seen."""
        entry = self._viz.get(instance_id)
        return dict(entry.phases) if entry else {}

    def url(self, instance_id: str, spec: AppSpec) -> str:
        """The public base URL, the instance's prefix and the app's entry path."""
        return objects.public_url(self._routing, spec, instance_id)

    async def stop_viz(self, instance_id: str) -> None:
        """Delete the route, the Service and the Deployment (its pods in the background).

        Raises:
            ValueError: `instance_id` is not a valid id.
        """
        _check_id(instance_id)
        name = objects.object_name(instance_id)
        found = await asyncio.gather(
            self.api.delete(self._route, name),
            self.api.delete(SERVICES, name),
            self.api.delete(DEPLOYMENTS, name, propagation="Background"),
        )
        if any(found):
            self._log.info("viz_instance_stopped", instance=instance_id)

    async def claim(self, instance_id: str) -> None:
        """Relabel a warm pool Deployment as in use (its pods keep running untouched).

        Raises:
            ValueError: `instance_id` is not a valid id.
        """
        _check_id(instance_id)
        patch = {"metadata": {"labels": {objects.POOLED: "false"}}}
        found = await self.api.patch(DEPLOYMENTS, objects.object_name(instance_id), patch)
        if found is None:
            self._log.warning("viz_claim_missed", instance=instance_id)
            return
        self._seen(found)
        self._log.info("viz_instance_claimed", instance=instance_id)

    async def list_instances(self) -> list[Instance]:
        """Deployments and Jobs with the managed-by label: two LISTs (paged), whatever the count.

        A Deployment is alive unless it is being deleted or Kubernetes gave up
        on it (no ready pod within its progress deadline); a Job while it has
        neither completed nor failed.
        """
        (deployments, _), (jobs, _) = await asyncio.gather(
            self.api.list(DEPLOYMENTS, objects.SELECTOR), self.api.list(JOBS, objects.SELECTOR)
        )
        found = [status.instance_of(d, "viz") for d in deployments]
        found += [status.instance_of(j, "job") for j in jobs]
        return [i for i in found if i is not None]

    # -- runs --

    async def submit_job(self, launch: JobLaunch, spec: AppSpec) -> None:
        """Create the run's Job (suspended), its inputs Secret owned by it, then resume it.

        Raises:
            ValueError: the job id is not valid.
            handlers.errors.StartFailed: the spec cannot run here, or the API refused it.
            handlers.errors.PermanentError: `forbidden`: the Role lacks a permission.
            handlers.errors.RetryableError: the API did not answer; try again later.
        """
        if not JOB_ID_RE.match(launch.job_id):
            raise ValueError(f"not a job id: {launch.job_id!r}")
        now = time.time()
        try:
            job = objects.make_job(
                launch,
                spec,
                template=self._templates["job"],
                created_at=now,
                backoff_limit=self._settings.job_backoff_limit,
                ttl_s=self._settings.job_ttl_s,
                image_pull_policy=self._settings.image_pull_policy,
            )
        except ValueError as exc:
            raise StartFailed(str(exc), code=codes.START_FAILED) from exc
        name = objects.object_name(launch.job_id)
        with _start_errors():
            found = await self.api.create(JOBS, job)
            created = found is not None
            found = found or await self.api.get(JOBS, name)
            if found is None:
                raise RetryableError("the run's Job was deleted while it was submitted", delay=1.0)
            secret = objects.make_job_secret(
                launch, spec.name, owner=objects.owner_reference(found), created_at=now
            )
            await self.api.create(SECRETS, secret)
            if (found.get("spec") or {}).get("suspend"):
                await self.api.patch(JOBS, name, {"spec": {"suspend": False}})
        if created:
            self._log.info("job_created", job_id=launch.job_id, app=spec.name)

    async def cancel_job(self, job_id: str) -> None:
        """Delete the run's Job (its pod in the background) and its inputs Secret.

        Raises:
            ValueError: `job_id` is not a valid id.
        """
        _check_id(job_id)
        deleted, _ = await asyncio.gather(
            self.api.delete(JOBS, objects.object_name(job_id), propagation="Background"),
            self.api.delete(SECRETS, objects.secret_name(job_id)),
        )
        if deleted:
            self._log.info("job_deleted", job_id=job_id)

    async def watch_jobs(self, report: JobReport, stopping: asyncio.Event) -> None:
        """Report each run's state as the Job and pod watches see it change, until `stopping`.

        A run is `running` once its pod runs, `succeeded` when the Job completes,
        `timed_out` when it failed with DeadlineExceeded, else `failed` with the
        container's exit code and the end of its log; `cancelled` when its Job
        is deleted before it ended. Every run present at the start is reported
        again (reports are de-duplicated downstream).
        """
        reported: dict[str, str] = {}
        changes = self._job_changes = asyncio.Queue()
        stop = asyncio.create_task(stopping.wait(), name="k8s-watch-jobs-stop")
        try:
            synced = asyncio.create_task(self._watching(JOBS, PODS), name="k8s-watch-jobs-sync")
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
                state = self._job_state(job_id, reported.get(job_id))
                if state is None or reported.get(job_id) == state:
                    continue
                update = await self._job_update(job_id, state)
                try:
                    await report(update)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._log.warning("job_report_failed", job_id=job_id, error=repr(exc))
                    asyncio.get_running_loop().call_later(1.0, changes.put_nowait, job_id)
                    continue
                reported[job_id] = state
        finally:
            stop.cancel()
            self._job_changes = None
            self._jobs_gone.clear()

    def _job_state(self, job_id: str, reported: str | None) -> str | None:
        """The state to report for a run, from the watches; None: nothing (new) to say."""
        job = self._jobs.get(job_id)
        if job is not None:
            return status.job_state(job, self._job_pods.get(job_id, {}))
        last = self._jobs_gone.pop(job_id, None)
        if last is None or reported in ("succeeded", "failed", "timed_out", "cancelled"):
            return None
        ended = status.job_state(last, self._job_pods.get(job_id, {}))
        return "cancelled" if ended in (None, "running") else None

    async def _job_update(self, job_id: str, state: str) -> JobUpdate:
        if state not in ("failed", "timed_out"):
            code = 0 if state == "succeeded" else None
            return JobUpdate(job_id=job_id, state=state, exit_code=code)
        pods = list(self._job_pods.get(job_id, {}).values())
        if not any(status.exit_code(p, objects.JOB_CONTAINER) is not None for p in pods):
            selector = f"{objects.SELECTOR},{objects.INSTANCE}={job_id}"
            with contextlib.suppress(ApiError, RetryableError):
                pods, _ = await self.api.list(PODS, selector)
        pods.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
        pod = pods[-1] if pods else None
        code = status.exit_code(pod, objects.JOB_CONTAINER) if pod else None
        tail = await self._tail(pod, objects.JOB_CONTAINER, prefix=False)
        return JobUpdate(job_id=job_id, state=state, exit_code=code, log_tail=tail or None)

    # -- watches and what they tell --

    async def _watching(self, *resources: Resource) -> None:
        """Start the watches not yet running; return once each has listed its objects."""
        for res in resources:
            if res not in self._watches:
                self._synced[res] = asyncio.Event()
                task = asyncio.create_task(
                    self.api.watch(res, objects.SELECTOR, functools.partial(self._on_event, res)),
                    name=f"k8s-watch:{res.plural}",
                )
                task.add_done_callback(functools.partial(self._watch_ended, res))
                self._watches[res] = task
        for res in resources:
            await self._synced[res].wait()
            if res in self._errors:
                raise self._errors[res]

    def _watch_ended(self, res: Resource, task: asyncio.Task) -> None:
        """A watch ends only when cancelled; if it died, fail its waiters (the next starts it)."""
        if self._watches.get(res) is task:
            del self._watches[res]
        if task.cancelled() or task.exception() is None:
            return
        error = repr(task.exception())
        self._log.error("k8s_watch_died", resource=str(res), error=error)
        self._on_event(res, "ERROR", PermanentError(f"watching {res} failed: {error}"))

    def _on_event(self, res: Resource, kind: str, payload) -> None:
        if kind == "ERROR":
            self._errors[res] = payload
            self._synced[res].set()
            for entry in self._viz.values():
                entry.touch()
            return
        self._errors.pop(res, None)
        if res == DEPLOYMENTS:
            handle = self._on_deployment
        elif res == PODS:
            handle = self._on_pod
        else:
            handle = self._on_job
        if kind == "SYNC":
            self._forget(res, {_key(obj, res) for obj in payload})
            for obj in payload:
                handle("ADDED", obj)
            self._synced[res].set()
        else:
            handle(kind, payload)

    def _forget(self, res: Resource, present: set) -> None:
        """After a (re)list, drop what the list no longer holds."""
        if res == DEPLOYMENTS:
            for iid, entry in list(self._viz.items()):
                if entry.deployment is not None and iid not in present:
                    entry.deployment = None
                    entry.touch()
        elif res == PODS:
            for entry in self._viz.values():
                for name in entry.pods.keys() - present:
                    del entry.pods[name]
                    entry.touch()
            for pods in self._job_pods.values():
                for name in pods.keys() - present:
                    del pods[name]
        else:
            for job_id in self._jobs.keys() - present:
                self._job_gone(job_id, self._jobs.pop(job_id))

    def _entry(self, instance_id: str) -> _Viz:
        entry = self._viz.get(instance_id)
        if entry is None:
            entry = self._viz[instance_id] = _Viz()
        return entry

    def _seen(self, deployment: dict) -> None:
        """Note a Deployment an API call returned, if the watch keeps the cache current."""
        if DEPLOYMENTS in self._watches:
            self._on_deployment("MODIFIED", deployment)

    def _on_deployment(self, kind: str, obj: dict) -> None:
        instance_id = status.label(obj, objects.INSTANCE)
        if instance_id is None:
            return
        entry = self._entry(instance_id)
        entry.deployment = None if kind == "DELETED" else obj
        if entry.deployment is None and not entry.pods:
            del self._viz[instance_id]
        entry.touch()

    def _on_pod(self, kind: str, pod: dict) -> None:
        owner = status.label(pod, objects.INSTANCE)
        name = (pod.get("metadata") or {}).get("name")
        if owner is None or name is None:
            return
        if status.label(pod, objects.COMPONENT) == "job":
            pods = self._job_pods.setdefault(owner, {})
            if kind == "DELETED":
                pods.pop(name, None)
                if not pods:
                    del self._job_pods[owner]
            else:
                pods[name] = pod
            self._job_changed(owner)
            return
        entry = self._entry(owner)
        if kind == "DELETED":
            entry.pods.pop(name, None)
        else:
            entry.pods[name] = pod
            status.note_phases(entry.phases, pod)
        if entry.deployment is None and not entry.pods:
            del self._viz[owner]
        entry.touch()

    def _on_job(self, kind: str, job: dict) -> None:
        job_id = status.label(job, objects.INSTANCE)
        if job_id is None:
            return
        if kind == "DELETED":
            self._jobs.pop(job_id, None)
            self._job_gone(job_id, job)
            return
        self._jobs[job_id] = job
        self._job_changed(job_id)

    def _job_gone(self, job_id: str, last: dict) -> None:
        if self._job_changes is not None:
            self._jobs_gone[job_id] = last
            self._job_changes.put_nowait(job_id)

    def _job_changed(self, job_id: str) -> None:
        if self._job_changes is not None:
            self._job_changes.put_nowait(job_id)

    async def _tail(
        self, pod: dict | None, container: str = objects.VIZ_CONTAINER, *, prefix: bool = True
    ) -> str:
        """The end of a pod's log ('' if there is none or it cannot be read)."""
        lines = self._settings.log_tail_lines
        if pod is None or not lines:
            return ""
        found = status.container_status(pod, container) or {}
        previous = bool(found.get("restartCount")) and "terminated" not in (
            found.get("state") or {}
        )
        name = pod["metadata"]["name"]
        try:
            text = (await self.api.pod_log(name, container, lines, previous)).strip()
        except (ApiError, RetryableError) as exc:
            self._log.warning("pod_log_unreadable", pod=name, error=str(exc))
            return ""
        tail = "\n".join(text.splitlines()[-lines:])
        return f"; last log lines:\n{tail}" if prefix and tail else tail


@contextlib.contextmanager
def _start_errors():
    """API refusals while starting become `StartFailed`, but for `forbidden` and `unauthorized`."""
    try:
        yield
    except ApiError as exc:
        if exc.code in (codes.FORBIDDEN, codes.UNAUTHORIZED):
            raise
        raise StartFailed(exc.message, code=codes.START_FAILED) from exc
    except ValueError as exc:  # an object without a uid to own others
        raise StartFailed(str(exc), code=codes.START_FAILED) from exc


def _check_id(instance_id: str) -> None:
    if not (INSTANCE_ID_RE.match(instance_id) or JOB_ID_RE.match(instance_id)):
        raise ValueError(f"not an instance or job id: {instance_id!r}")


def _key(obj: dict, res: Resource) -> str | None:
    """What the caches key `obj` by: instance id (Deployments, Jobs) or pod name."""
    if res == PODS:
        return (obj.get("metadata") or {}).get("name")
    return status.label(obj, objects.INSTANCE)
