"""Runs viz apps and jobs as processes on this machine, for `spinyard up` and one-box installs.

Each viz instance is an OS process in its own session, started from the app
spec's `command` on a free loopback port, serving under its URL prefix; the
gateway reverse-proxies `/apps/<owner>/<title>/<instance>/` to it through
`target()`. What it is given (placeholders, environment) is the launch
contract, `dispatcher.backends.launch`, with the values of the secrets its
spec names from their 0600 files (`secrets.py`). Several handler processes may share
one data dir, so all that is known about an instance lives on disk, in a
state file (`instances.py`), never only in memory; the app's stdout and
stderr go to `<state_dir>/logs/<id>.log`.

Each job is supervised by a runner process (`jobrunner.py`, which documents
what a run gets; `jobfiles.py` the files under `<state_dir>/jobs/<job_id>/`);
the runner tells `watch_jobs` (`jobwatch.py`) through the datagram socket
`<state_dir>/jobs.sock` when the run starts and ends.

Apps and runs outlive a crashed handler on purpose: a redelivered page load
must find and reuse the instance rather than start a second one, and after a
restart `list_instances` still finds every process so the reaper can stop
them. The start time from /proc/<pid>/stat tells a live process from a
recycled pid. Linux only: it reads /proc.
"""

import asyncio
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import aiohttp

from dispatcher import logs
from dispatcher.backends.base import Backend, Instance, JobLaunch, http_host, instance_prefix
from dispatcher.backends.launch import (
    argv,
    check_id,
    check_job_id,
    last_answer,
    not_ready_message,
    valid_id,
    viz_env,
    viz_values,
)
from dispatcher.backends.local import jobfiles, locks, processes, readiness
from dispatcher.backends.local.instances import InstanceFiles, InstanceState
from dispatcher.backends.local.jobfiles import JobDir, Listings, notify, remove_stale_staging
from dispatcher.backends.local.jobrunner import CLAIMED, RUNNING
from dispatcher.backends.local.jobwatch import JobWatcher
from dispatcher.backends.local.paths import LocalPaths
from dispatcher.backends.local.secrets import SecretFiles
from dispatcher.backends.local.staging import job_instructions, stage, start_runner
from dispatcher.backends.local.warm import WarmRunners
from dispatcher.backends.settings import LocalBackendSettings
from handlers.errors import StartFailed
from handlers.ports import JobReport, WarmHandOver
from schemas import errors as codes
from schemas.events import JobUpdate
from schemas.spec import AppSpec

_CONNECT_TIMEOUT_S = 0.5  # a claim's check that the port accepts (loopback: well under 1 ms)
_TAIL_LINES = 10  # of an app's log, in a start failure (at most _TAIL_BYTES)
_TAIL_BYTES = 2048
_RUNNER_EXIT_S = 5.0  # how long a runner that wrote its result may take to exit
_STALE_STAGING_S = 3600.0  # a job being submitted for this long was left by a dead submitter


class LocalBackend(Backend):
    """Viz instances and jobs as local processes, with their state in files under `data_dir`."""

    name = "local"
    warm_runners = True
    takeover_s = 2.0  # how often a waiting job watcher tries to take over the socket

    def __init__(self, settings: LocalBackendSettings, data_dir: Path, public_url: str) -> None:
        self._settings = settings
        self._paths = paths = LocalPaths.of(data_dir, settings.state_dir)
        self._logs, self._jobs, self._socket = paths.logs, paths.jobs, paths.socket
        self._listings = Listings(self._jobs)
        self._public_url = public_url.rstrip("/")
        self._python = settings.python or sys.executable
        self._secrets = SecretFiles.under(data_dir)  # what the gateway and the CLI write
        self._log = logs.get("spinyard.backend.local")
        self._instances = InstanceFiles(paths.instances, self._log)
        self._warm = WarmRunners(
            paths.warm, self._jobs, self._instances, self._python, self._log,
            fork_max_age_s=settings.warm_fork_max_age_s,
        )  # fmt: skip

    async def setup(self) -> None:
        """Create the state, log and job directories.

        Raises:
            RuntimeError: this is not Linux (there is no /proc to read), or the
                configured `state_dir` is not this user's alone (`paths.StateDirError`).
        """
        try:
            processes.boot_id()
        except OSError as exc:
            raise RuntimeError("the local backend needs Linux /proc") from exc
        self._mkdirs()

    async def cleanup(self) -> None:
        """Reap exited children. Running instances and jobs are left alone."""
        processes.reap()

    async def start_viz(self, instance_id: str, spec: AppSpec, *, pooled: bool = False) -> None:
        """Start the app's command unless this instance already runs; return at once.

        The command and environment are the launch contract's (`launch.viz_env`, secrets
        included), on a free port of `settings.host`; it gets none of spinyard's settings.

        Raises:
            ValueError: `instance_id` is not a valid instance id.
            handlers.errors.StartFailed: the command or its working directory does not exist;
                `missing_secret`: a secret the spec names is not set.
        """
        check_id(instance_id)
        processes.reap()
        self._mkdirs()
        async with self._instances.locked(instance_id):
            old = self._instances.load(instance_id)
            if old is not None and processes.alive(old.process):
                return
            if old is not None:  # it died: clear what is left of its group first
                processes.signal_group(old.process, signal.SIGKILL)
            host, prefix = self._settings.host, instance_prefix(instance_id, spec)
            port = self._free_port()
            values = viz_values(port=port, prefix=prefix, host=host, python=self._python)
            secrets = self._secrets.resolve(spec)  # StartFailed before a process exists
            env = processes.child_env(viz_env(spec, instance_id, values, secrets))
            log = self._logs / f"{instance_id}.log"
            try:
                _, proc = processes.spawn(argv(spec, values), env, spec.workdir, log)
            except processes.SpawnError as exc:
                raise StartFailed(str(exc), code=codes.START_FAILED) from exc
            state = InstanceState(
                id=instance_id, app=spec.name, kind="viz", port=port, pooled=pooled,
                pid=proc.pid, start_time=proc.start_time, boot_id=proc.boot_id,
                host=host, created_at=time.time(),
            )  # fmt: skip
            self._instances.write(state)
        self._log.info("viz_process_started", **state.fields(), pooled=pooled, restarted=bool(old))

    async def wait_ready(self, instance_id: str, spec: AppSpec, timeout: float) -> None:  # noqa: ASYNC109
        """Poll `http://host:port<prefix><readiness_path>` until it answers 200-399.

        Any other answer (a 404 from an app that ignored its prefix, a 500) is not
        ready, as for a Kubernetes httpGet probe.

        Raises:
            handlers.errors.StartFailed: `start_failed` if the process is not running
                (with its exit code), `start_timeout` after `timeout` (with the probe's
                last answer); both with the app's last log lines as `log_tail`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        path = instance_prefix(instance_id, spec).rstrip("/") + spec.readiness_path
        # Probe often at first, when most apps come up, then back off to the period:
        # a fixed 50 ms period cost a fast app up to 50 ms of its cold start.
        pause = min(0.005, self._settings.probe_interval_s)
        answer = "none yet"
        async with aiohttp.ClientSession() as http:
            while True:
                state = self._instances.load(instance_id)
                if state is None:
                    raise StartFailed("the app's instance is not running", code=codes.START_FAILED)
                if not processes.alive(state.process):
                    raise StartFailed(
                        readiness.exit_message(processes.exit_code(state.process)),
                        code=codes.START_FAILED,
                        log_tail=self._log_tail(state.id),
                    )
                url = f"http://{http_host(state.host)}:{state.port}{path}"
                probe_s = max(0.05, min(readiness.PROBE_TIMEOUT_S, deadline - loop.time()))
                ready, answer = await readiness.probe(http, url, probe_s)
                if ready and processes.alive(state.process):
                    return
                if loop.time() >= deadline:
                    raise StartFailed(
                        not_ready_message(timeout, last_answer(spec.readiness_path, answer)),
                        code=codes.START_TIMEOUT,
                        log_tail=self._log_tail(state.id),
                    )
                await asyncio.sleep(min(pause, deadline - loop.time()))
                pause = min(pause * 1.5, self._settings.probe_interval_s)

    def url(self, instance_id: str, spec: AppSpec) -> str:
        """The gateway URL of the instance's entry page."""
        return self._public_url + instance_prefix(instance_id, spec) + spec.entry_path

    async def target(self, instance_id: str) -> tuple[str, str] | None:
        """(app, `http://host:port`) of a running instance, else None. A stat and a /proc read."""
        if not valid_id(instance_id):
            return None
        state = self._instances.load(instance_id)
        if state is None or state.kind != "viz" or not processes.alive(state.process):
            return None
        return state.app, f"http://{http_host(state.host)}:{state.port}"

    async def stop_viz(self, instance_id: str) -> None:
        """SIGTERM the instance's process group, SIGKILL it after the grace; forget it.

        Raises:
            ValueError: `instance_id` is not a valid instance id.
        """
        check_id(instance_id)
        async with self._instances.locked(instance_id) as lock_path:
            state = self._instances.load(instance_id)
            outcome = (
                "gone"
                if state is None
                else await processes.terminate(state.process, self._settings.stop_grace_s)
            )
            if outcome == "survived":  # keep the record so the reaper tries again
                self._log.error("viz_process_survived_kill", instance=instance_id, pid=state.pid)
                return
            self._instances.remove(instance_id)
            self._warm.remove_dir(instance_id)
            lock_path.unlink(missing_ok=True)  # under the lock: waiters notice and retry
        if state is not None:
            self._log.info(f"{state.kind}_process_stopped", **state.fields(), how=outcome)

    async def claim(self, instance_id: str) -> bool:
        """Mark a warm pool instance as in use, if its process runs and its port accepts.

        Returns:
            False, and nothing is marked, if the instance is gone or dead (its
            process died with an earlier `spinyard up`, say).

        Raises:
            ValueError: `instance_id` is not a valid instance id.
        """
        check_id(instance_id)
        async with self._instances.locked(instance_id):
            state = self._instances.load(instance_id)
            if state is None:
                self._log.warning("viz_claim_missed", instance=instance_id)
                return False
            if state.kind == "warm":
                return await self._warm.claim(state)
            if not processes.alive(state.process) or not await processes.accepts(
                state.host, state.port, _CONNECT_TIMEOUT_S
            ):
                self._log.warning("viz_claim_dead", **state.fields())
                return False
            if state.pooled:
                self._instances.write(state.model_copy(update={"pooled": False}))
        self._log.info("viz_instance_claimed", **state.fields())
        return True

    async def list_instances(self) -> list[Instance]:
        """Every instance with a state file and every job with files, viz first.

        `alive` is False once an instance's process, or a job's runner, has gone. A
        job's `state` label is `starting`, `running` or the state of its result.
        """
        processes.reap()
        found = [s.instance(alive=processes.alive(s.process)) for s in self._instances.all()]
        remove_stale_staging(self._jobs, _STALE_STAGING_S)
        self._warm.sweep(_STALE_STAGING_S)
        found += [Instance(id=j, kind="job", **fields) for j, fields in self._listings.all()]
        return found

    # -- jobs --

    async def submit_job(self, launch: JobLaunch, spec: AppSpec) -> None:
        """Start a runner for the job unless the job exists (running or finished).

        Returns once the runner has taken the job on (about the time Python takes
        to start), before the run has started. Submissions of one job from any
        number of processes at once start one run.

        Raises:
            ValueError: `launch.job_id` is not a job id.
            handlers.errors.StartFailed: the spec's resources are not quantities, or
                the runner could not be started.
        """
        job = self._job(launch.job_id)
        stage = await asyncio.to_thread(self._stage, job, launch, spec)  # file writes: off the loop
        if stage is None:
            return
        try:
            claimed = await start_runner(stage, nice=self._settings.run_nice)
        except processes.SpawnError as exc:
            raise StartFailed(str(exc), code=codes.START_FAILED) from exc
        if claimed:
            notify(self._socket, job.id)  # so the watcher watches the runner from now on
            self._log.info("job_runner_started", job_id=job.id, app=spec.name)

    async def start_warm(self, instance_id: str, spec: AppSpec, timeout: float) -> None:  # noqa: ASYNC109
        """Start a warm runner for the job app (see `warm.py`); return once it waits."""
        self._mkdirs()
        await self._warm.start(instance_id, spec, timeout, self._secrets.resolve(spec))

    async def submit_warm(
        self, launch: JobLaunch, spec: AppSpec, instance_id: str
    ) -> WarmHandOver | None:
        """Hand the job to the claimed warm runner `instance_id`, which writes its files
        as `submit_job` would and starts it: "running" once the model's process is there
        (a few ms); "taken" if the job existed (a redelivered start) or its model did not
        start (its result says why); None if the runner could not take it (it died, say).
        Either way the runner is no warm runner any more once this returns."""
        job = self._job(launch.job_id)
        if job.path.exists():  # the job exists: the runner is not needed
            await self.stop_viz(instance_id)
            notify(self._socket, job.id, jobfiles.UNTOLD)  # its start may be unrecorded
            return "taken"
        instructions = self._instructions(job, launch, spec)
        notify(self._socket, job.id, jobfiles.TOLD)  # the caller records a start answered RUNNING
        answer = await self._warm.hand(instance_id, launch, instructions)
        notify(self._socket, job.id, "" if answer == RUNNING else jobfiles.UNTOLD)
        if answer is None:
            self._log.warning("warm_runner_lost", instance=instance_id, job_id=job.id)
            return None
        if answer in (RUNNING, CLAIMED):
            self._log.info("job_runner_warm", job_id=job.id, app=spec.name, instance=instance_id)
        return "running" if answer == RUNNING else "taken"

    def _instructions(self, job: JobDir, launch: JobLaunch, spec: AppSpec) -> dict:
        """`staging.job_instructions` with this backend's interpreter, grace, niceness and
        socket."""
        grace, nice = self._settings.stop_grace_s, self._settings.run_nice
        how = {"python": self._python, "stop_grace_s": grace, "nice": nice}
        secrets = self._secrets.resolve(spec)
        return job_instructions(job, launch, spec, **how, socket=self._socket, secrets=secrets)

    def _stage(self, job: JobDir, launch: JobLaunch, spec: AppSpec) -> JobDir | None:
        """The job's files in a staging directory (`staging.stage`); None if the job exists."""
        self._mkdirs()
        instructions = self._instructions(job, launch, spec)  # bad resources raise, job or not
        return None if job.path.exists() else stage(job, launch, instructions)

    async def cancel_job(self, job_id: str) -> None:
        """Stop a running job (it ends `cancelled`), or remove the files of a finished one.

        A running job's runner gets SIGTERM and stops the run, which the watcher
        then reports; its files stay until `cancel_job` is called again, so the
        reaper removes them once the job's record expires. Cancelling a job that
        is gone does nothing.

        Raises:
            ValueError: `job_id` is not a job id.
        """
        job = self._job(job_id)
        self._mkdirs()
        async with locks.locked(job.lock):
            runner = job.runner()
            if runner is not None and job.result() is None:
                grace = self._settings.stop_grace_s
                how = await job.stop(runner, "cancelled", "the run was cancelled", grace)
                self._log.info("job_cancelled", job_id=job_id, how=how)
                return
            if runner is not None and not await processes.wait_gone(runner, _RUNNER_EXIT_S):
                await processes.terminate(runner, 0)  # it wrote its result, then got stuck
            existed = job.path.exists()
            shutil.rmtree(job.path, ignore_errors=True)
            job.lock.unlink(missing_ok=True)  # under the lock: waiters notice and retry
        if existed:
            self._log.info("job_files_removed", job_id=job_id)

    async def watch_jobs(self, report: JobReport, stopping: asyncio.Event) -> None:
        """Report each job's start and end until `stopping` is set (see `JobWatcher`)."""
        self._mkdirs()

        async def send(fields: dict) -> None:
            await report(JobUpdate(**fields))

        watcher = JobWatcher(self._jobs, self._socket, send, self._settings.stop_grace_s)
        watcher.takeover_s = self.takeover_s
        await watcher.watch(stopping)

    def _job(self, job_id: str) -> JobDir:
        return JobDir(self._jobs, check_job_id(job_id))

    # -- viz processes --

    def _log_tail(self, instance_id: str) -> str:
        """The app's last log lines for a start failure, a line repeated shown once: an app
        that logs each request fills its log with the probe's, and the lines before stay."""
        text = processes.tail(self._logs / f"{instance_id}.log", 400, 16 * _TAIL_BYTES)
        return "\n".join(processes.collapse_repeats(text)[-_TAIL_LINES:])[-_TAIL_BYTES:]

    def _free_port(self) -> int:
        """A free port on the host, not one another instance was given (it may be slow to bind)."""
        taken = {state.port for state in self._instances.all()}
        family = socket.AF_INET6 if ":" in self._settings.host else socket.AF_INET
        for _ in range(20):
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((self._settings.host, 0))
                port = sock.getsockname()[1]
            if port not in taken:
                break
        return port

    def _mkdirs(self) -> None:
        self._paths.make()
