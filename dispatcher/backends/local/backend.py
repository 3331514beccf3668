"""Runs viz apps and jobs as processes on this machine, for `spinyard up` and one-box installs.

Each viz instance is an OS process in its own session, started from the app
spec's `command` on a free loopback port, serving under its URL prefix; the
gateway reverse-proxies `/apps/<owner>/<title>/<instance>/` to it through
`target()`. Several handler processes may share one data dir, so all that is
known about an instance lives on disk, never only in memory:

    <data_dir>/local/instances/<id>.json   pid, port, app, kind, pooled, created_at,
                                           the process start time and boot id
    <data_dir>/local/instances/<id>.lock   flock held while starting, stopping or relabelling
    <data_dir>/local/logs/<id>.log         the app's stdout and stderr

Each job is supervised by a runner process (`jobrunner.py`, which documents
what a run gets and the files under `<data_dir>/local/jobs/<job_id>/`); the
runner tells `watch_jobs` (`jobwatch.py`) through the datagram socket
`<data_dir>/local/jobs.sock` when the run starts and ends.

Apps and runs outlive a crashed handler on purpose: a redelivered page load
must find and reuse the instance rather than start a second one, and after a
restart `list_instances` still finds every process so the reaper can stop
them. The start time from /proc/<pid>/stat tells a live process from a
recycled pid. Linux only: it reads /proc.
"""

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import aiohttp
from pydantic import BaseModel, ConfigDict

from dispatcher import logs
from dispatcher.backends.base import Backend, Instance, JobLaunch, http_host, instance_prefix
from dispatcher.backends.local import processes
from dispatcher.backends.local.jobrunner import (
    JobDir,
    cpu_seconds,
    job_ids,
    notify,
    prepare,
    remove_stale_staging,
    start_runner,
)
from dispatcher.backends.local.jobwatch import JobWatcher
from dispatcher.settings import LocalBackendSettings
from handlers.errors import StartFailed
from handlers.ports import JobReport
from schemas import errors as codes
from schemas.events import JobUpdate
from schemas.names import INSTANCE_ID_RE, JOB_ID_RE
from schemas.spec import AppSpec

_PLACEHOLDER = re.compile(r"\{(port|prefix|host|python)\}")
_PROBE_TIMEOUT_S = 2.0  # one readiness request, at most
_TAIL_LINES = 10
_RUNNER_EXIT_S = 5.0  # how long a runner that wrote its result may take to exit
_STALE_STAGING_S = 3600.0  # a job being submitted for this long was left by a dead submitter


class _State(BaseModel):
    """What the state file says about one instance."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    app: str
    kind: Literal["viz", "job"]
    pid: int
    start_time: int  # clock ticks after boot: field 22 of /proc/<pid>/stat
    boot_id: str
    host: str
    port: int
    pooled: bool = False
    created_at: float

    @property
    def process(self) -> processes.Process:
        return processes.Process(self.pid, self.start_time, self.boot_id)

    def instance(self, alive: bool) -> Instance:
        common = self.model_dump(include={"id", "app", "kind", "created_at", "pooled"})
        return Instance(
            **common, alive=alive, labels={"pid": str(self.pid), "port": str(self.port)}
        )

    def fields(self) -> dict:
        """What log lines say about the instance."""
        return {"instance": self.id, "app": self.app, "pid": self.pid, "port": self.port}


class LocalBackend(Backend):
    """Viz instances and jobs as local processes, with their state in files under `data_dir`."""

    name = "local"
    takeover_s = 2.0  # how often a waiting job watcher tries to take over the socket

    def __init__(self, settings: LocalBackendSettings, data_dir: Path, public_url: str) -> None:
        self._settings = settings
        self._states = Path(data_dir) / "local" / "instances"
        self._logs = Path(data_dir) / "local" / "logs"
        self._jobs = Path(data_dir) / "local" / "jobs"
        self._socket = Path(data_dir) / "local" / "jobs.sock"
        self._public_url = public_url.rstrip("/")
        self._python = settings.python or sys.executable
        self._cache: dict[str, tuple[tuple[int, int, int], _State | None]] = {}
        self._log = logs.get("spinyard.backend.local")

    async def setup(self) -> None:
        """Create the state, log and job directories.

        Raises:
            RuntimeError: this is not Linux (there is no /proc to read).
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

        `{port}`, `{prefix}`, `{host}` and `{python}` are replaced in the command
        and in `spec.env` values; the app also gets SPINYARD_PORT, SPINYARD_PREFIX,
        SPINYARD_INSTANCE and SPINYARD_APP, and none of spinyard's own settings.

        Raises:
            ValueError: `instance_id` is not a valid instance id.
            handlers.errors.StartFailed: the command or its working directory does not exist.
        """
        _check_id(instance_id)
        processes.reap()
        async with self._locked(instance_id):
            old = self._load(instance_id)
            if old is not None and processes.alive(old.process):
                return
            if old is not None:  # it died: clear what is left of its group first
                processes.signal_group(old.process, signal.SIGKILL)
            host, prefix = self._settings.host, instance_prefix(instance_id, spec)
            port = self._free_port()
            values = {"port": str(port), "prefix": prefix, "host": host, "python": self._python}
            ours = {"PORT": str(port), "PREFIX": prefix, "INSTANCE": instance_id, "APP": spec.name}
            env = {k: _fill(v, values) for k, v in spec.env.items()}
            env |= {f"SPINYARD_{k}": v for k, v in ours.items()}
            argv = [_fill(arg, values) for arg in spec.command]
            try:
                _, proc = processes.spawn(
                    argv, processes.child_env(env), spec.workdir, self._logs / f"{instance_id}.log"
                )
            except processes.SpawnError as exc:
                raise StartFailed(str(exc), code=codes.START_FAILED) from exc
            state = _State(
                id=instance_id, app=spec.name, kind="viz", port=port, pooled=pooled,
                pid=proc.pid, start_time=proc.start_time, boot_id=proc.boot_id,
                host=host, created_at=time.time(),
            )  # fmt: skip
            self._write(state)
        self._log.info("viz_process_started", **state.fields(), pooled=pooled, restarted=bool(old))

    async def wait_ready(self, instance_id: str, spec: AppSpec, timeout: float) -> None:  # noqa: ASYNC109
        """Poll `http://host:port<prefix><readiness_path>` until it answers below 500.

        Raises:
            handlers.errors.StartFailed: `start_failed` if the process is not running
                (with its exit code and last log lines), `start_timeout` after `timeout`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        path = instance_prefix(instance_id, spec).rstrip("/") + spec.readiness_path
        # Probe often at first, when most apps come up, then back off to the period:
        # a fixed 50 ms period cost a fast app up to 50 ms of its cold start.
        pause = min(0.005, self._settings.probe_interval_s)
        async with aiohttp.ClientSession() as http:
            while True:
                state = self._load(instance_id)
                if state is None:
                    raise StartFailed("the app's instance is not running", code=codes.START_FAILED)
                if not processes.alive(state.process):
                    raise StartFailed(self._exit_message(state), code=codes.START_FAILED)
                url = f"http://{http_host(state.host)}:{state.port}{path}"
                probe_s = max(0.05, min(_PROBE_TIMEOUT_S, deadline - loop.time()))
                if await _answers(http, url, probe_s) and processes.alive(state.process):
                    return
                if loop.time() >= deadline:
                    raise StartFailed(
                        f"the app did not answer {spec.readiness_path} within {timeout:g} s",
                        code=codes.START_TIMEOUT,
                    )
                await asyncio.sleep(min(pause, deadline - loop.time()))
                pause = min(pause * 1.5, self._settings.probe_interval_s)

    def url(self, instance_id: str, spec: AppSpec) -> str:
        """The gateway URL of the instance's entry page."""
        return self._public_url + instance_prefix(instance_id, spec) + spec.entry_path

    async def target(self, instance_id: str) -> tuple[str, str] | None:
        """(app, `http://host:port`) of a running instance, else None. A stat and a /proc read."""
        if not _valid_id(instance_id):
            return None
        state = self._load(instance_id)
        if state is None or state.kind != "viz" or not processes.alive(state.process):
            return None
        return state.app, f"http://{http_host(state.host)}:{state.port}"

    async def stop_viz(self, instance_id: str) -> None:
        """SIGTERM the instance's process group, SIGKILL it after the grace; forget it.

        Raises:
            ValueError: `instance_id` is not a valid instance id.
        """
        _check_id(instance_id)
        async with self._locked(instance_id) as lock_path:
            state = self._load(instance_id)
            outcome = (
                "gone"
                if state is None
                else await processes.terminate(state.process, self._settings.stop_grace_s)
            )
            if outcome == "survived":  # keep the record so the reaper tries again
                self._log.error("viz_process_survived_kill", instance=instance_id, pid=state.pid)
                return
            self._state_path(instance_id).unlink(missing_ok=True)
            lock_path.unlink(missing_ok=True)  # under the lock: waiters notice and retry
        self._cache.pop(instance_id, None)
        if state is not None:
            self._log.info("viz_process_stopped", **state.fields(), how=outcome)

    async def claim(self, instance_id: str) -> None:
        """Mark a warm pool instance as in use. Does nothing if it is gone.

        Raises:
            ValueError: `instance_id` is not a valid instance id.
        """
        _check_id(instance_id)
        async with self._locked(instance_id):
            state = self._load(instance_id)
            if state is None:
                self._log.warning("viz_claim_missed", instance=instance_id)
                return
            if state.pooled:
                self._write(state.model_copy(update={"pooled": False}))
        self._log.info("viz_instance_claimed", **state.fields())

    async def list_instances(self) -> list[Instance]:
        """Every instance with a state file and every job with files, viz first.

        `alive` is False once an instance's process, or a job's runner, has gone. A
        job's `state` label is `starting`, `running` or the state of its result.
        """
        processes.reap()
        ids = self._ids()
        for stale in self._cache.keys() - set(ids):
            del self._cache[stale]
        states = [s for s in map(self._load, ids) if s is not None]
        found = [s.instance(alive=processes.alive(s.process)) for s in states]
        remove_stale_staging(self._jobs, _STALE_STAGING_S)
        for job in map(self._job, job_ids(self._jobs)):
            if (fields := job.listing()) is not None:  # else being submitted, or half removed
                found.append(Instance(id=job.id, kind="job", **fields))
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
        self._mkdirs()
        try:
            memory = processes.memory_bytes(spec.resources.memory)
            cores = processes.quantity(spec.resources.cpu)
        except ValueError as exc:
            raise StartFailed(f"the app's resources: {exc}", code=codes.START_FAILED) from exc
        if job.path.exists():
            return
        values = {"python": self._python}
        run = {
            "app": spec.name,
            "argv": [_fill(arg, values) for arg in spec.command],
            "cwd": spec.workdir,
            "env": {k: _fill(v, values) for k, v in spec.env.items()},
            "deadline_s": launch.deadline_s,
            "stop_grace_s": self._settings.stop_grace_s,
            "memory_bytes": memory,
            "cpu_seconds": cpu_seconds(cores, launch.deadline_s),
            "socket": str(self._socket),
        }
        stage = JobDir.staging(self._jobs, job.id)  # filled here, moved into place by the runner
        try:
            prepare(stage, job, launch.inputs, launch.upload_urls, run)
        except BaseException:
            shutil.rmtree(stage.path, ignore_errors=True)
            raise
        try:
            claimed = await start_runner(stage)
        except processes.SpawnError as exc:
            raise StartFailed(str(exc), code=codes.START_FAILED) from exc
        if claimed:
            notify(self._socket, job.id)  # so the watcher watches the runner from now on
            self._log.info("job_runner_started", job_id=job.id, app=spec.name)

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
        async with processes.locked(job.lock):
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
        if not JOB_ID_RE.match(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return JobDir(self._jobs, job_id)

    # -- viz processes --

    def _exit_message(self, state: _State) -> str:
        code = processes.exit_code(state.process)
        if code is None:
            what = "the app exited"
        elif code < 0:
            what = f"the app was killed by {signal.Signals(-code).name}"
        else:
            what = f"the app exited with code {code}"
        tail = processes.tail(self._logs / f"{state.id}.log", _TAIL_LINES)
        return f"{what} before it was ready" + (f"; last log lines:\n{tail}" if tail else "")

    def _free_port(self) -> int:
        """A free port on the host, not one another instance was given (it may be slow to bind)."""
        taken = {s.port for i in self._ids() if (s := self._load(i)) is not None}
        family = socket.AF_INET6 if ":" in self._settings.host else socket.AF_INET
        for _ in range(20):
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((self._settings.host, 0))
                port = sock.getsockname()[1]
            if port not in taken:
                break
        return port

    # -- state files --

    def _mkdirs(self) -> None:
        for directory in (self._states, self._logs, self._jobs):
            directory.mkdir(parents=True, exist_ok=True)
        self._jobs.chmod(0o700)  # inputs and upload URLs are the runs' own

    def _ids(self) -> list[str]:
        """The ids of every state file, sorted."""
        try:
            names = sorted(os.listdir(self._states))
        except FileNotFoundError:
            return []
        return [n[: -len(".json")] for n in names if n.endswith(".json") and not n.startswith(".")]

    def _state_path(self, instance_id: str) -> Path:
        return self._states / f"{instance_id}.json"

    def _load(self, instance_id: str) -> _State | None:
        """The instance's state, re-read only when its file changed; None if missing or corrupt."""
        path = self._state_path(instance_id)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._cache.pop(instance_id, None)
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._cache.get(instance_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            state: _State | None = _State.model_validate_json(path.read_bytes())
            if state.id != instance_id:
                raise ValueError(f"the file is about instance {state.id!r}")
        except FileNotFoundError:  # removed since the stat
            self._cache.pop(instance_id, None)
            return None
        except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            error = str(exc).splitlines()[0]
            self._log.warning("instance_state_unreadable", path=str(path), error=error)
            state = None
        self._cache[instance_id] = (key, state)
        return state

    def _write(self, state: _State) -> None:
        """Replace the state file atomically, so readers never see half of it."""
        processes.write_atomic(self._state_path(state.id), state.model_dump_json().encode())

    @contextlib.asynccontextmanager
    async def _locked(self, instance_id: str) -> AsyncIterator[Path]:
        """Hold the instance's lock file (shared by every process on this data dir)."""
        self._mkdirs()
        async with processes.locked(self._states / f"{instance_id}.lock") as path:
            yield path


def _valid_id(instance_id: str) -> bool:
    """Ids name files and URL path segments: only the shapes spinyard makes are accepted."""
    return bool(INSTANCE_ID_RE.match(instance_id) or JOB_ID_RE.match(instance_id))


def _check_id(instance_id: str) -> None:
    if not _valid_id(instance_id):
        raise ValueError(f"not an instance or job id: {instance_id!r}")


def _fill(text: str, values: dict[str, str]) -> str:
    """Replace the known placeholders only; other braces stay as they are."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


async def _answers(http: aiohttp.ClientSession, url: str, limit_s: float) -> bool:
    """Whether `url` answers within `limit_s` with a status below 500 (redirects count)."""
    try:
        timeout = aiohttp.ClientTimeout(total=limit_s)
        async with http.get(url, allow_redirects=False, timeout=timeout) as resp:
            return resp.status < 500
    except (aiohttp.ClientError, TimeoutError):
        return False
