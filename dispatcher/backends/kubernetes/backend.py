"""Runs viz apps as Deployments and runs as Jobs on a Kubernetes cluster.

A viz instance is a Deployment, a Service and a route (see objects.py);
a warm pool instance is the same, labelled `spinyard.io/pooled=true` until it
is claimed. A run is a Job and its inputs Secret, or a warm runner's pod
(warm.py). Everything is found again by the managed-by label, so a restarted
handler knows what runs without any state of its own, and every operation is
idempotent: a create that meets an existing object (409) keeps it, a delete
that finds nothing (404) is done.

What happens after a create is learned from one informer per watched kind
(informer.py: list, then watch, resumed from the last resourceVersion or
listed again), started on first need: `wait_ready` waits for the Deployment
and Pod informers to say that a pod is ready or has failed (readiness.py;
a failure also reads the probe's last answer from the pod's Events, probes.py),
and `watch_jobs` turns what the Job and Pod informers see into reports
(job_reports.py). The API is reached only through `KubeApi` (api.py).
"""

import asyncio
import contextlib
import time
from pathlib import Path

import yaml
from kubernetes import client

from dispatcher import logs
from dispatcher.backends.base import Backend, Instance, JobLaunch
from dispatcher.backends.kubernetes import informer, objects, status, warm
from dispatcher.backends.kubernetes.api import KubeApi
from dispatcher.backends.kubernetes.informer import Informer
from dispatcher.backends.kubernetes.job_reports import JobReports
from dispatcher.backends.kubernetes.logtail import PodLogs
from dispatcher.backends.kubernetes.readiness import Readiness
from dispatcher.backends.kubernetes.resources import (
    DEPLOYMENTS,
    INGRESSES,
    INGRESSROUTES,
    JOBS,
    PODS,
    SECRETS,
    SERVICES,
)
from dispatcher.backends.kubernetes.secrets import SecretObjects
from dispatcher.backends.kubernetes.warm import WarmPods
from dispatcher.backends.launch import check_id, check_job_id, last_answer, not_ready_message
from dispatcher.backends.secrets import check_secrets
from dispatcher.backends.settings import KubernetesBackendSettings
from handlers.errors import PermanentError, RetryableError, StartFailed
from handlers.ports import JobReport, WarmHandOver
from schemas import errors as codes
from schemas.spec import AppSpec


class KubernetesBackend(Backend):
    """Viz instances and runs as Kubernetes objects in one namespace."""

    name = "kubernetes"
    warm_runners = True

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
        self._secrets = SecretObjects(self.api)  # names only: pods read the values themselves
        self._templates: dict[str, dict] = {}
        self._deployments = Informer(self.api, DEPLOYMENTS, objects.SELECTOR)
        self._pods = Informer(self.api, PODS, objects.SELECTOR)
        self._jobs = Informer(self.api, JOBS, objects.SELECTOR)
        self._readiness = Readiness(self._deployments, self._pods)
        self._job_reports = JobReports(self._jobs, self._pods)
        self._logs = PodLogs(self.api, settings.log_tail_lines)
        self._warm = WarmPods(self.api, self._pods, settings, self._logs)
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
        """Stop the informers and drop connections. Instances and runs keep running."""
        await asyncio.gather(self._deployments.stop(), self._pods.stop(), self._jobs.stop())
        await self._warm.close()
        self.api.close()

    # -- viz instances --

    async def start_viz(self, instance_id: str, spec: AppSpec, *, pooled: bool = False) -> None:
        """Create the instance's Deployment, Service and route; those that exist are kept.

        Raises:
            ValueError: `instance_id` is not a valid id.
            handlers.errors.StartFailed: the spec cannot run here (no image);
                `missing_secret`: a secret the spec names is not in the app's Secret.
            handlers.errors.PermanentError: the API refused the objects (`ApiError`;
                `forbidden` when the Role lacks a permission); not for a page's eyes.
            handlers.errors.RetryableError: the API did not answer; try again later.
        """
        check_id(instance_id)
        await self._check_secrets(spec)
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
        self._deployments.note(found)
        if created:
            self._log.info(
                "viz_deployment_created", instance=instance_id, app=spec.name, pooled=pooled
            )

    async def wait_ready(self, instance_id: str, spec: AppSpec, timeout: float) -> None:  # noqa: ASYNC109
        """Wait for the watches to report a ready pod (its readiness probe passed).

        Raises:
            handlers.errors.StartFailed: `start_failed` if the instance does not exist,
                its container exited or cannot start (with its exit code), or
                Kubernetes gave up on it; `start_timeout` after `timeout` (with what it
                still waits for); both with the pod's last log lines as `log_tail`, and
                the readiness probe's last answer if the app ran and its pod's Events
                say it (probes.py). Ready is kubelet's httpGet probe answered 200-399.
            handlers.errors.PermanentError: `forbidden`: the Role does not allow watching.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            async with asyncio.timeout(timeout):
                await informer.synced(self._deployments, self._pods)
        except TimeoutError:
            message = not_ready_message(timeout, "the cluster's watches did not answer")
            raise StartFailed(message, code=codes.START_TIMEOUT) from None
        if not self._readiness.knows(instance_id):
            found = await self.api.get(DEPLOYMENTS, objects.object_name(instance_id))
            if found is None or not status.ours(found):
                raise StartFailed("the app's instance is not running", code=codes.START_FAILED)
            self._deployments.note(found)
        verdict, message, pod = await self._readiness.wait(instance_id, deadline)
        if verdict == status.READY:
            self._log.info("viz_instance_ready", instance=instance_id, **self.phases(instance_id))
            return
        if verdict == status.GONE:
            raise StartFailed(message, code=codes.START_FAILED)
        limit_s = self._settings.events_timeout_s
        tail, answer = await asyncio.gather(
            self._logs.tail(pod), self._logs.probe_answer(pod, limit_s)
        )
        said = last_answer(spec.readiness_path, answer) if answer else None
        if verdict == status.FAILED:
            message = f"{message}; {said}" if said else message
            raise StartFailed(message, code=codes.START_FAILED, log_tail=tail)
        message = not_ready_message(timeout, said or message or "no pod yet")
        raise StartFailed(message, code=codes.START_TIMEOUT, log_tail=tail)

    def phases(self, instance_id: str) -> dict[str, float]:
        """Unix times at which the instance's pod was scheduled, started and ready, as seen."""
        return self._readiness.phases(instance_id)

    def url(self, instance_id: str, spec: AppSpec) -> str:
        """The public base URL, the instance's prefix and the app's entry path."""
        return objects.public_url(self._routing, spec, instance_id)

    async def stop_viz(self, instance_id: str) -> None:
        """Delete the route, the Service and the Deployment (its pods in the background), or
        the warm runner's pod unless it has a run.

        Raises:
            ValueError: `instance_id` is not a valid id.
        """
        check_id(instance_id)
        name = objects.object_name(instance_id)
        if self._warm.cached(instance_id) is None:  # a warm pod this process has seen
            found = await asyncio.gather(
                self.api.delete(self._route, name),
                self.api.delete(SERVICES, name),
                self.api.delete(DEPLOYMENTS, name, propagation="Background"),
            )
            if any(found):
                self._log.info("viz_instance_stopped", instance=instance_id)
                return
        if await self._warm.stop(instance_id):
            self._log.info("warm_pod_stopped", instance=instance_id)

    async def claim(self, instance_id: str) -> bool:
        """Relabel a warm pool Deployment as in use (its pods keep running untouched).

        Returns:
            False if the Deployment is gone, being deleted, or given up on.

        Raises:
            ValueError: `instance_id` is not a valid id.
        """
        check_id(instance_id)
        if (pod := self._warm.cached(instance_id)) is not None:
            return warm.waiting(pod)  # a warm runner: relabelled when handed its run
        patch = {"metadata": {"labels": {objects.POOLED: "false"}}}
        found = await self.api.patch(DEPLOYMENTS, objects.object_name(instance_id), patch)
        if found is None:
            if (waiting := await self._warm.claim(instance_id)) is not None:
                return waiting
            self._log.warning("viz_claim_missed", instance=instance_id)
            return False
        self._deployments.note(found)
        listed = status.instance_of(found, "viz")
        if listed is None or not listed.alive:
            self._log.warning("viz_claim_dead", instance=instance_id)
            return False
        self._log.info("viz_instance_claimed", instance=instance_id)
        return True

    async def list_instances(self) -> list[Instance]:
        """Deployments, Jobs and warm pods with the managed-by label: three LISTs (paged),
        whatever the count. A warm pod is listed as its run's job once it has one.

        A Deployment is alive unless it is being deleted or Kubernetes gave up
        on it (no ready pod within its progress deadline); a Job while it has
        neither completed nor failed.
        """
        (deployments, _), (jobs, _), runners = await asyncio.gather(
            self.api.list(DEPLOYMENTS, objects.SELECTOR),
            self.api.list(JOBS, objects.SELECTOR),
            self._warm.listed(),
        )
        found = [status.instance_of(d, "viz") for d in deployments]
        found += [status.instance_of(j, "job") for j in jobs]
        cold = {i.id for i in found if i is not None}
        found += [r for r in runners if r.id not in cold]  # a Job's word counts over a pod's
        return [i for i in found if i is not None]

    async def start_warm(self, instance_id: str, spec: AppSpec, timeout: float) -> None:  # noqa: ASYNC109
        """Create a warm runner's pod unless it exists; return once it waits for a run.

        Raises:
            handlers.errors.StartFailed: no image, it exited or went, or it was not ready
                within `timeout` (with its log's tail).
        """
        await self._check_secrets(spec)
        await self._warm.start(instance_id, spec, self._templates["job"], timeout)

    async def submit_warm(
        self, launch: JobLaunch, spec: AppSpec, instance_id: str
    ) -> WarmHandOver | None:
        """Hand a run to a claimed warm runner's pod (see `WarmPods.hand`)."""
        return await self._warm.hand(launch, spec, instance_id)

    async def submit_job(self, launch: JobLaunch, spec: AppSpec) -> None:
        """Create the run's Job (suspended), its inputs Secret owned by it, then resume it.

        Raises:
            ValueError: the job id is not valid.
            handlers.errors.StartFailed: the spec cannot run here (no image);
                `missing_secret`: a secret the spec names is not in the app's Secret.
            handlers.errors.PermanentError: the API refused the objects (`ApiError`;
                `forbidden` when the Role lacks a permission); not for a page's eyes.
            handlers.errors.RetryableError: the API did not answer; try again later.
        """
        check_job_id(launch.job_id)
        if (spec.pool.size or spec.schedule) and await self._warm.resume(launch, spec):
            return  # a warm pod has it already (a redelivered start): one run
        await self._check_secrets(spec)
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
        """Delete the run's Job (its pod in the background) and its inputs Secret, or the
        warm runner's pod that runs it.

        Raises:
            ValueError: `job_id` is not a valid id.
        """
        check_id(job_id)
        deleted, _ = await asyncio.gather(
            self.api.delete(JOBS, objects.object_name(job_id), propagation="Background"),
            self.api.delete(SECRETS, objects.secret_name(job_id)),
        )
        for pod in [] if deleted else await self._warm.of_run(job_id):
            name = pod["metadata"]["name"]
            deleted = await self.api.delete(PODS, name) or deleted  # a warm run has no Job
        if deleted:
            self._log.info("job_deleted", job_id=job_id)

    async def watch_jobs(self, report: JobReport, stopping: asyncio.Event) -> None:
        """Report each run's state as the Job and pod watches see it change, until `stopping`.

        A run is `running` once its pod runs, `succeeded` when the Job completes,
        `timed_out` when it failed with DeadlineExceeded, else `failed` with the
        container's exit code and the end of its log; `cancelled` when its Job
        is deleted before it ended. Every run present at the start is reported
        again (reports are de-duplicated downstream). A warm run's pod is deleted
        once its end is reported (`WarmPods.clear`).
        """
        await self._job_reports.watch(self._warm.clearing(report), stopping, self._logs.job_update)

    async def _check_secrets(self, spec: AppSpec) -> None:
        """Fail a start whose spec names a secret the app's Secret lacks, before any object
        is made: a pod would otherwise wait in CreateContainerConfigError until its timeout."""
        if spec.secrets:
            with _start_errors():
                check_secrets(spec, await self._secrets.names(spec.name))


@contextlib.contextmanager
def _start_errors():
    """Any API refusal while starting fails it for good, for operators' eyes only.

    `ApiError` is a `PermanentError` and not a `PublicError`: its text names the
    namespace, the service account and the Role, so a page reads `internal`,
    and the handler's log and the dead letter carry the detail.
    """
    try:
        yield
    except ValueError as exc:  # an object the API returned without a uid to own others
        raise PermanentError(f"cannot own objects by it: {exc}") from exc
