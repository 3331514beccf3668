"""Runs viz apps as processes on this machine, for `spinyard up` and one-box installs.

Each instance is an OS process in its own session, started from the app
spec's `command` on a free loopback port, serving under its URL prefix; the
gateway reverse-proxies `/apps/<owner>/<title>/<instance>/` to it through
`target()`. Several handler processes may share one data dir, so all that is
known about an instance lives on disk, never only in memory:

    <data_dir>/local/instances/<id>.json   pid, port, app, kind, pooled, created_at,
                                           the process start time and boot id
    <data_dir>/local/instances/<id>.lock   flock held while starting, stopping or relabelling
    <data_dir>/local/logs/<id>.log         the app's stdout and stderr

Apps outlive a crashed handler on purpose: a redelivered page load must find
and reuse the instance rather than start a second one, and after a restart
`list_instances` still finds every process so the reaper can stop them. The
start time from /proc/<pid>/stat tells a live instance from a recycled pid.
Linux only: it reads /proc.
"""

import asyncio
import contextlib
import fcntl
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

import aiohttp
from pydantic import BaseModel, ConfigDict

from dispatcher import logs
from dispatcher.backends.base import Backend, Instance, http_host, instance_prefix
from dispatcher.settings import LocalBackendSettings
from handlers.errors import StartFailed
from schemas import errors as codes
from schemas.names import INSTANCE_ID_RE, JOB_ID_RE
from schemas.spec import AppSpec

_DEAD = ("Z", "X", "x")  # /proc states of a process that has exited
_PLACEHOLDER = re.compile(r"\{(port|prefix|host|python)\}")
_POLL_S = 0.02  # how often a stop checks whether the process group is gone
_KILL_WAIT_S = 5.0  # how long to wait for SIGKILL to take effect
_PROBE_TIMEOUT_S = 2.0  # one readiness request, at most
_TAIL_LINES = 10

# Child processes belong to this OS process, not to one backend object: any
# object may stop what another started, and an exited child stays a zombie
# until waited for. So the handles live here, keyed by pid, until reaped.
_children: dict[int, tuple[subprocess.Popen, int]] = {}
_exit_codes: OrderedDict[tuple[int, int], int] = OrderedDict()


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

    def instance(self, alive: bool) -> Instance:
        common = self.model_dump(include={"id", "app", "kind", "created_at", "pooled"})
        return Instance(
            **common, alive=alive, labels={"pid": str(self.pid), "port": str(self.port)}
        )

    def fields(self) -> dict:
        """What log lines say about the instance."""
        return {"instance": self.id, "app": self.app, "pid": self.pid, "port": self.port}


class LocalBackend(Backend):
    """Viz instances as local processes, with their state in files under `data_dir`."""

    name = "local"

    def __init__(self, settings: LocalBackendSettings, data_dir: Path, public_url: str) -> None:
        self._settings = settings
        self._states = Path(data_dir) / "local" / "instances"
        self._logs = Path(data_dir) / "local" / "logs"
        self._public_url = public_url.rstrip("/")
        self._python = settings.python or sys.executable
        self._cache: dict[str, tuple[tuple[int, int, int], _State | None]] = {}
        self._log = logs.get("spinyard.backend.local")

    async def setup(self) -> None:
        """Create the state and log directories.

        Raises:
            RuntimeError: this is not Linux (there is no /proc to read).
        """
        try:
            _boot_id()
        except OSError as exc:
            raise RuntimeError("the local backend needs Linux /proc") from exc
        self._states.mkdir(parents=True, exist_ok=True)
        self._logs.mkdir(parents=True, exist_ok=True)

    async def cleanup(self) -> None:
        """Reap exited children. Running instances are left alone."""
        _reap()

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
        _reap()
        async with self._locked(instance_id):
            old = self._load(instance_id)
            if old is not None and self._alive(old):
                return
            if old is not None:  # it died: clear what is left of its group first
                _signal_group(old, signal.SIGKILL)
            host, prefix = self._settings.host, instance_prefix(instance_id, spec)
            port = self._free_port()
            values = {"port": str(port), "prefix": prefix, "host": host, "python": self._python}
            ours = {"PORT": str(port), "PREFIX": prefix, "INSTANCE": instance_id, "APP": spec.name}
            env = {k: _fill(v, values) for k, v in spec.env.items()}
            env |= {f"SPINYARD_{k}": v for k, v in ours.items()}
            argv = [_fill(arg, values) for arg in spec.command]
            record = {"id": instance_id, "app": spec.name, "kind": "viz", "port": port}
            state = self._spawn(argv, env, spec.workdir, **record, pooled=pooled)
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
        async with aiohttp.ClientSession() as http:
            while True:
                state = self._load(instance_id)
                if state is None:
                    raise StartFailed("the app's instance is not running", code=codes.START_FAILED)
                if not self._alive(state):
                    raise StartFailed(self._exit_message(state), code=codes.START_FAILED)
                url = f"http://{http_host(state.host)}:{state.port}{path}"
                probe_s = max(0.05, min(_PROBE_TIMEOUT_S, deadline - loop.time()))
                if await _answers(http, url, probe_s) and self._alive(state):
                    return
                if loop.time() >= deadline:
                    raise StartFailed(
                        f"the app did not answer {spec.readiness_path} within {timeout:g} s",
                        code=codes.START_TIMEOUT,
                    )
                await asyncio.sleep(min(self._settings.probe_interval_s, deadline - loop.time()))

    def url(self, instance_id: str, spec: AppSpec) -> str:
        """The gateway URL of the instance's entry page."""
        return self._public_url + instance_prefix(instance_id, spec) + spec.entry_path

    async def target(self, instance_id: str) -> tuple[str, str] | None:
        """(app, `http://host:port`) of a running instance, else None. A stat and a /proc read."""
        if not _valid_id(instance_id):
            return None
        state = self._load(instance_id)
        if state is None or state.kind != "viz" or not self._alive(state):
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
            outcome = "gone" if state is None else await self._terminate(state)
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
        """Every instance with a state file; `alive` is False once its process has gone."""
        _reap()
        ids = self._ids()
        for stale in self._cache.keys() - set(ids):
            del self._cache[stale]
        states = [s for s in map(self._load, ids) if s is not None]
        return [s.instance(alive=self._alive(s)) for s in states]

    # -- processes, shared by viz instances and (later) jobs --

    def _spawn(self, argv: list[str], env: dict[str, str], cwd: str | None, **record) -> _State:
        """Start `argv` in a new session, logging to the instance's log file, and record it.

        `record` holds the state fields the caller knows (id, app, kind, port,
        pooled). The caller holds the instance's lock.
        """
        if cwd is not None and not Path(cwd).is_dir():
            raise StartFailed(
                f"the app's working directory {cwd} does not exist", code=codes.START_FAILED
            )
        with open(self._logs / f"{record['id']}.log", "ab") as log_file:
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    env=_child_env(env),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise StartFailed(
                    f"could not run {argv[0]!r}: {exc.strerror or exc}", code=codes.START_FAILED
                ) from exc
        stat = _proc_stat(proc.pid)  # an unreaped child keeps its /proc entry even if it exited
        start_time = stat[2] if stat else 0
        _children[proc.pid] = (proc, start_time)
        state = _State(
            **record,
            pid=proc.pid,
            start_time=start_time,
            boot_id=_boot_id(),
            host=self._settings.host,
            created_at=time.time(),
        )
        self._write(state)
        return state

    async def _terminate(self, state: _State) -> str:
        """Stop the process group: 'gone' (nothing ran), 'terminated', 'killed' or 'survived'."""
        if not _signal_group(state, signal.SIGTERM):
            return "gone"
        if await _wait_gone(state, self._settings.stop_grace_s):
            return "terminated"
        _signal_group(state, signal.SIGKILL)
        return "killed" if await _wait_gone(state, _KILL_WAIT_S) else "survived"

    def _alive(self, state: _State) -> bool:
        return state.boot_id == _boot_id() and _runs(state.pid, state.start_time)

    def _exit_message(self, state: _State) -> str:
        _reap()
        code = _exit_codes.get((state.pid, state.start_time))
        if code is None:
            what = "the app exited"
        elif code < 0:
            what = f"the app was killed by {signal.Signals(-code).name}"
        else:
            what = f"the app exited with code {code}"
        tail = _tail(self._logs / f"{state.id}.log", _TAIL_LINES)
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
        path = self._state_path(state.id)
        tmp = path.with_name(f".{state.id}.{os.getpid()}.tmp")
        tmp.write_text(state.model_dump_json())
        os.replace(tmp, path)

    @contextlib.asynccontextmanager
    async def _locked(self, instance_id: str) -> AsyncIterator[Path]:
        """Hold the instance's lock file (shared by every process on this data dir)."""
        self._states.mkdir(parents=True, exist_ok=True)
        self._logs.mkdir(parents=True, exist_ok=True)
        path = self._states / f"{instance_id}.lock"
        fd = _lock(path, wait=False)
        if fd is None:
            task = asyncio.ensure_future(asyncio.to_thread(_lock, path, True))
            try:
                fd = await asyncio.shield(task)
            except asyncio.CancelledError:
                task.add_done_callback(_release_later)
                raise
        try:
            yield path
        finally:
            os.close(fd)


def _lock(path: Path, wait: bool) -> int | None:
    """flock `path` (again, if it was replaced meanwhile); None if it is busy and not `wait`."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except BlockingIOError:
            os.close(fd)
            return None
        except FileNotFoundError:  # removed by a stop while we waited
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _release_later(task: asyncio.Future) -> None:
    """Close a lock whose waiter was cancelled before the lock came."""
    if not task.cancelled() and task.exception() is None:
        os.close(task.result())


def _valid_id(instance_id: str) -> bool:
    """Ids name files and URL path segments: only the shapes spinyard makes are accepted."""
    return bool(INSTANCE_ID_RE.match(instance_id) or JOB_ID_RE.match(instance_id))


def _check_id(instance_id: str) -> None:
    if not _valid_id(instance_id):
        raise ValueError(f"not an instance or job id: {instance_id!r}")


def _fill(text: str, values: dict[str, str]) -> str:
    """Replace the known placeholders only; other braces stay as they are."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    """Our environment (PATH, HOME, locale...) minus spinyard's settings, which hold
    NATS and storage credentials; then the app's own variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINYARD_")}
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach the log file as they are written
    return env | extra


@functools.cache
def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time) of `pid` from /proc, or None if there is no such pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()  # the command name may hold spaces
    return fields[0].decode(), int(fields[2]), int(fields[19])


def _runs(pid: int, start_time: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in _DEAD and stat[2] == start_time


def _signal_group(state: _State, sig: signal.Signals) -> bool:
    """Signal the instance's process group; False if nothing of it is left to signal."""
    if state.boot_id != _boot_id():
        return False
    stat = _proc_stat(state.pid)
    if stat is not None and stat[2] != state.start_time:
        return False  # a recycled pid: the kernel reuses one only once its group is empty
    try:
        os.killpg(state.pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _group_runs(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies do not count)."""
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _proc_stat(int(name))) is not None:
            if stat[1] == pgid and stat[0] not in _DEAD:
                return True
    return False


async def _wait_gone(state: _State, within_s: float) -> bool:
    """Poll until the instance's process group has gone; False if it has not after `within_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while True:
        _reap()
        stat = _proc_stat(state.pid)
        if stat is not None and stat[2] != state.start_time:
            return True  # recycled pid: see _signal_group
        if (stat is None or stat[0] in _DEAD) and not _group_runs(state.pid):
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(_POLL_S)


def _reap() -> None:
    """Wait for exited children, remembering recent exit codes for error messages."""
    for pid, (proc, start_time) in list(_children.items()):
        code = proc.poll()
        if code is not None:
            del _children[pid]
            _exit_codes[(pid, start_time)] = code
            while len(_exit_codes) > 256:
                _exit_codes.popitem(last=False)


def _tail(path: Path, lines: int) -> str:
    """The last `lines` lines of a log file, read from its end."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").strip().splitlines()[-lines:])


async def _answers(http: aiohttp.ClientSession, url: str, limit_s: float) -> bool:
    """Whether `url` answers within `limit_s` with a status below 500 (redirects count)."""
    try:
        timeout = aiohttp.ClientTimeout(total=limit_s)
        async with http.get(url, allow_redirects=False, timeout=timeout) as resp:
            return resp.status < 500
    except (aiohttp.ClientError, TimeoutError):
        return False
