"""Processes and process groups on this machine, for the local backend.

The local backend (`backend.py`) and the job runner (`jobrunner.py`) share
these helpers: start a command in a new session, tell a live process from a
recycled pid (by its start time in /proc/<pid>/stat and the boot id), signal
and stop a whole process group, write files atomically, and turn Kubernetes
resource quantities into the numbers `setrlimit` takes. Only the standard
library; asyncio is imported only by the async helpers, which the runners
never call (it was a third of a runner's start). Linux only: it reads /proc.
"""

import contextlib
import ctypes
import functools
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple, NoReturn

DEAD = ("Z", "X", "x")  # /proc states of a process that has exited
PR_SET_CHILD_SUBREAPER = 36  # prctl options (linux/prctl.h)
PR_GET_CHILD_SUBREAPER = 37
POLL_S = 0.02  # how often a stop checks whether the process group is gone
KILL_WAIT_S = 5.0  # how long to wait for SIGKILL to take effect

# Child processes belong to this OS process, not to one backend object: any
# object may stop what another started, and an exited child stays a zombie
# until waited for. So the handles live here, keyed by pid, until reaped.
_children: dict[int, tuple[subprocess.Popen, int]] = {}
_exit_codes: OrderedDict[tuple[int, int], int] = OrderedDict()


class Process(NamedTuple):
    """A process as recorded on disk: its pid is ours only while the start time matches."""

    pid: int
    start_time: int  # clock ticks after boot: field 22 of /proc/<pid>/stat
    boot_id: str


class SpawnError(Exception):
    """The command could not be started (missing program or working directory)."""


@functools.cache
def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()  # the command name may hold spaces


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time) of `pid` from /proc, or None if there is no such pid."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return fields[0].decode(), int(fields[2]), int(fields[19])


def current(pid: int) -> Process:
    """The record of a process that runs now (a child not yet reaped counts)."""
    stat = proc_stat(pid)
    return Process(pid, stat[2] if stat else 0, boot_id())


def alive(proc: Process) -> bool:
    """Whether the recorded process still runs (not a zombie, not a recycled pid)."""
    if proc.boot_id != boot_id():
        return False
    stat = proc_stat(proc.pid)
    return stat is not None and stat[0] not in DEAD and stat[2] == proc.start_time


def signal_group(proc: Process, sig: signal.Signals) -> bool:
    """Signal the process group `proc` leads; False if nothing of it is left to signal."""
    if proc.boot_id != boot_id():
        return False
    stat = proc_stat(proc.pid)
    if stat is not None and stat[2] != proc.start_time:
        return False  # a recycled pid: the kernel reuses one only once its group is empty
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def group_runs(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies do not count)."""
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := proc_stat(int(name))) is not None:
            if stat[1] == pgid and stat[0] not in DEAD:
                return True
    return False


def become_subreaper() -> bool:
    """Adopt this process's orphaned descendants (Linux 3.4+); False where the OS does not allow.

    A process that leaves its group with setsid() and whose parent exits is
    then reparented here instead of to init, so `descendants` still finds it.
    """
    try:
        return _prctl()(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def childless_subreaper() -> bool:
    """Whether this process is a subreaper (`become_subreaper`) with no child left (running,
    or exited and not waited for): then nothing runs below it, whatever group or session it
    joined (an orphan goes to its nearest subreaper). A runner whose model is reaped asks
    this before `descendants` and `group_runs` read all of /proc (ms, with 100 processes)."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        flag = ctypes.c_int(0)
        try:
            got = _prctl()(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0)
        except (OSError, AttributeError):
            return False
        return got == 0 and flag.value == 1
    return False


@functools.cache
def _prctl():  # libc's prctl, looked up once
    return ctypes.CDLL(None, use_errno=True).prctl


def descendants(pid: int) -> list[int]:
    """The live processes below `pid` in the process tree, whatever their group or session."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (fields := _stat_fields(int(name))) is not None:
            if fields[0].decode() not in DEAD:
                children.setdefault(int(fields[1]), []).append(int(name))
    found, todo = [], list(children.get(pid, ()))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, ()))
    return found


def gone(proc: Process) -> bool:
    """Whether the process and every process of its group have exited."""
    reap()
    stat = proc_stat(proc.pid)
    if stat is not None and stat[2] != proc.start_time:
        return True  # recycled pid: see signal_group
    return (stat is None or stat[0] in DEAD) and not group_runs(proc.pid)


async def wait_gone(proc: Process, within_s: float) -> bool:
    """Poll until the process group has gone; False if it has not after `within_s`."""
    from dispatcher import waits  # asyncio: not at import (see the module's docstring)

    try:
        await waits.until(lambda: gone(proc), within_s, interval_s=POLL_S, what="the exit")
    except TimeoutError:
        return False
    return True


async def terminate(proc: Process, grace_s: float) -> str:
    """Stop the process group: 'gone' (nothing ran), 'terminated', 'killed' or 'survived'."""
    if not signal_group(proc, signal.SIGTERM):
        return "gone"
    if await wait_gone(proc, grace_s):
        return "terminated"
    signal_group(proc, signal.SIGKILL)
    return "killed" if await wait_gone(proc, KILL_WAIT_S) else "survived"


async def accepts(host: str, port: int, within_s: float) -> bool:
    """Whether `host:port` accepts a TCP connection within `within_s` (then closed)."""
    import asyncio

    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), within_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def spawn(
    argv: list[str],
    env: dict[str, str],
    cwd: str | Path | None,
    log_path: Path,
    stdin: int = subprocess.DEVNULL,
    stdout: int | None = None,
    nice: int = 0,
) -> tuple[subprocess.Popen, Process]:
    """Start `argv` in a new session with stderr (and stdout, unless given) appended to `log_path`.

    `nice` is added to our niceness (at most 19) right after the start, before the child
    has got far into its interpreter's start, and its session is given it
    (`nice_session`); what it starts inherits it. The handle is
    kept until the child is reaped, so any caller may stop it.

    Raises:
        SpawnError: the program or the working directory does not exist.
    """
    if cwd is not None and not Path(cwd).is_dir():
        raise SpawnError(f"the app's working directory {cwd} does not exist")
    with open_log(log_path) as log_file:
        try:
            popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=stdin,
                stdout=log_file if stdout is None else stdout,
                stderr=log_file,
                start_new_session=True,
            )
        except OSError as exc:
            raise SpawnError(f"could not run {argv[0]!r}: {exc.strerror or exc}") from exc
    with contextlib.suppress(OSError):  # it exited already: nothing to lower
        if nice > 0:
            ours = os.getpriority(os.PRIO_PROCESS, 0)
            os.setpriority(os.PRIO_PROCESS, popen.pid, min(ours + nice, 19))
        nice_session(popen.pid)
    proc = current(popen.pid)  # an unreaped child keeps its /proc entry even if it exited
    _children[popen.pid] = (popen, proc.start_time)
    return popen, proc


def nice_session(pid: int = 0, nice: int | None = None) -> None:
    """Lower `pid` (0: us) to niceness `nice` if given (never raising it), and make the
    session it leads as nice, where the kernel schedules sessions as groups (autogroup:
    `/proc/sys/kernel/sched_autogroup_enabled`, on by default in many distributions).

    There each session is weighed as one group, and a process's niceness counts only
    against the processes of its own session: a niced run in a session of its own would
    take as much CPU as the handlers' whole session (on 2 cores, a nice-0 process got 9 %
    of a core beside 20 niced runs in sessions of their own, 59 % once their sessions were
    niced too). Lowering a group's priority needs no privilege. Nothing happens at
    niceness 0, or on a kernel without autogroup.
    """
    with contextlib.suppress(OSError):
        if nice is not None and os.getpriority(os.PRIO_PROCESS, pid) < nice:
            os.setpriority(os.PRIO_PROCESS, pid, nice)
        if (nice := os.getpriority(os.PRIO_PROCESS, pid)) > 0:
            with open(f"/proc/{pid or 'self'}/autogroup", "w") as group:
                group.write(str(nice))


def open_log(path: Path) -> BinaryIO:
    """`path` opened for appending, created readable by its owner only."""
    return open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600), "ab")


def exit_now(code: int) -> NoReturn:
    """End this process with `code`, its output flushed, without the interpreter's tear-down
    (freeing every object: in a process forked from a warm runner that copies most of the
    pages it shares, about 10 ms of CPU; a runner has nothing left to finish by then)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def reap() -> None:
    """Wait for exited children, remembering recent exit codes for error messages."""
    for pid, (popen, start_time) in list(_children.items()):
        code = popen.poll()
        if code is not None:
            del _children[pid]
            _exit_codes[(pid, start_time)] = code
            while len(_exit_codes) > 256:
                _exit_codes.popitem(last=False)


def exit_code(proc: Process) -> int | None:
    """The exit code of a child this process started and reaped, if still remembered."""
    reap()
    return _exit_codes.get((proc.pid, proc.start_time))


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """Our environment (PATH, HOME, locale...) minus spinyard's settings, which hold
    NATS and storage credentials; then the app's own variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINYARD_")}
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach the log file as they are written
    return env | extra


def tail(path: Path, lines: int, max_bytes: int = 4096) -> str:
    """The last `lines` lines (of the last `max_bytes` bytes) of a log file."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode(errors="replace").strip().splitlines()[-lines:])


def collapse_repeats(text: str) -> list[str]:
    """The lines of `text`, each run of one repeated line shown once with a count."""
    lines: list[str] = []
    repeats = 0
    for line in [*text.splitlines(), None]:
        if lines and line == lines[-1]:
            repeats += 1
            continue
        if repeats:
            lines.append(f"[the line above {repeats} more times]")
            repeats = 0
        if line is not None:
            lines.append(line)
    return lines


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` at once (readers never see half of it), created with `mode`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with open(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def unix_address(path: Path) -> Iterator[str]:
    """An address for `path` usable by bind/sendto even past the 107-byte limit of AF_UNIX.

    A long path is reached through /proc/self/fd/<n> of its directory, held open meanwhile.
    """
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


# -- resource limits --

_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[KMGTPE]i|[mkMGTPE])?$")
_SUFFIX = {
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    **{f"{s}i": 1024 ** (n + 1) for n, s in enumerate("KMGTPE")},
}


def quantity(text: str) -> float:
    """A Kubernetes quantity (`512Mi`, `1G`, `500m`, `1.5`, `2e3`) as a number.

    Raises:
        ValueError: `text` is not a quantity.
    """
    match = _QUANTITY.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a Kubernetes quantity such as 512Mi, 1Gi or 500m")
    number, suffix = match.groups()
    if suffix and suffix[0] in "eE":
        return float(number + suffix)
    return float(number) * _SUFFIX.get(suffix or "", 1)


def memory_bytes(text: str) -> int:
    """A memory quantity in whole bytes (at least one page).

    Raises:
        ValueError: `text` is not a quantity.
    """
    return max(4096, math.ceil(quantity(text)))
