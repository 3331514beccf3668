"""The warm runner: a job runner started ahead for an app's pool, waiting for its run.

`LocalBackend.start_warm` (`warm.py`) starts `python -m
dispatcher.backends.local.warmrunner <dir>` in a new session, in a directory
of its own, `<data_dir>/local/warm/<instance>/` (0700):

    warm.json   what it was started for: app, argv, cwd, preload, fork, memory_bytes, jobs
                (and, for the backend only, what decides who may fork it: `warm.py`)
    sock        the unix stream socket it waits on (0600)
    warm.log    its stderr until it has a run (then the run's runner.log)

The runner removes the directory itself once it has answered its run.

It runs with the app's environment as a cold runner's model would have it
without the run's own variables: the handler's environment minus every
SPINYARD_* variable (no credentials), then the spec's `env`. Its address
space is limited to the app's `resources.memory` (a forked run inherits it,
so what it preloads counts toward the run's memory). For a Python model
(`fork`: a command of `{python} script.py ...` or `{python} -m module ...`)
it changes to the app's workdir, puts the script's directory first on
`sys.path` as Python would, and imports each `preload` module. Then it
binds its socket and writes `ready` on stdout.

A run hands it the path of a job directory prepared as for a cold start
(`jobfiles.prepare`); from then on it is that job's runner
(`jobrunner.run`): it claims the job and starts the model, then answers
`running` on the socket (`exists` if another runner has the job; `claimed`
if the model did not start, which the run's result then tells). A Python
model is forked from the runner: the child makes a session of its own, takes
the run's environment, cwd, stdin, limits and `sys.argv`, and runs the
script with runpy, so the preloaded modules are imported already; any other
command is exec'd as a cold runner does (the runner's own start is saved).
Deadline, cancel, log cap and result files are the cold runner's. One run
per warm runner; a SIGTERM while it waits ends it. Like the job runner it
imports nothing of spinyard but the job runner's modules, so any interpreter
that runs the model can run it.

While it waits it may also be asked for a sibling: `fork <dir>` on the
socket, `<dir>` a new runner's directory beside its own, with a warm.json
the backend wrote (`WarmRunners.start` asks only a runner started for the
same spec, revision and environment). It forks twice, so the new runner is
no child of its own: that one makes a session of its own, a new signal
pipe, its log and its socket in `<dir>`, then answers `ready <pid>` on the
connection, and once the asker says `ok` (it recorded the runner; without
it the sibling exits) waits for a run as any warm runner does. It costs a fork (a
millisecond or two), not an interpreter's start and the preloads' imports,
and it has everything imported that its parent has.
"""

import atexit
import contextlib
import gc
import importlib
import os
import runpy
import shutil
import signal
import socket
import sys
import threading
import traceback
from pathlib import Path

from dispatcher.backends.local import jobrunner, processes
from dispatcher.backends.local.jobfiles import JobDir, read_json
from dispatcher.backends.local.joblog import CappedLog

READY = b"ready\n"  # what a warm runner writes on stdout once it waits for a run
FORK = b"fork "  # what asks a waiting runner for a sibling: `fork <dir>`
FORKED = b"ok\n"  # the asker's word that it recorded the sibling's `ready <pid>`
SOCKET = "sock"
_HAND_TIMEOUT_S = 5.0  # how long a connected submitter may take to name its job


def forks(argv: list[str]) -> bool:
    """Whether a run of `argv` (the spec's command, unfilled) is forked from a warm runner:
    `{python} script.py ...` or `{python} -m module ...`; any other option is exec'd."""
    if len(argv) < 2 or argv[0] != "{python}":
        return False
    return (argv[1] == "-m" and len(argv) > 2) or not argv[1].startswith("-")


def _script_dir(argv: list[str], cwd: str) -> str:
    """What Python puts first on `sys.path` for `argv`: the script's directory, or cwd for -m."""
    if argv[1] == "-m":
        return cwd
    return os.path.dirname(os.path.join(cwd, argv[1]))


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    # As the interpreter does for `sys.exit("message")`: the message goes to the model's
    # stderr (its log), not to spinyard's logging; this runs in the forked model.
    sys.stderr.write(f"{exc.code}\n")
    return 1


def _python_main(argv: list[str]) -> None:
    """Run the model's script or module as `__main__`, as `python` would."""
    sys.path[0] = _script_dir(argv, os.getcwd())
    if argv[1] == "-m":
        sys.argv = [argv[2], *argv[3:]]
        runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv[1:]
        runpy.run_path(argv[1], run_name="__main__")


def _reseed() -> None:
    """Seed numpy's global generator anew, if a preload imported numpy: runs forked from
    one lineage of runners would all draw the same numbers from it (Python's `random`
    is reseeded at every fork by Python itself)."""
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        with contextlib.suppress(Exception):
            numpy_random.seed()


def _child(spec: dict, stdin: int, out: int, closing: tuple[int, ...]) -> None:
    """The forked model: a session, stdio, cwd, limits and environment of its own; never
    returns."""
    code = 1
    try:
        os.setsid()
        _reseed()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.dup2(stdin, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        for fd in {stdin, out, *closing}:
            with contextlib.suppress(OSError):
                os.close(fd)
        os.chdir(spec["cwd"])
        jobrunner.set_limits(spec.get("memory_bytes"), spec.get("cpu_seconds"))
        os.environ.clear()
        os.environ.update(spec["env"])
        _python_main(spec["argv"])
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:  # the model's error goes to its log, as python's would
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            threading._shutdown()  # type: ignore[attr-defined]  # non-daemon threads, as at exit
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


class _Warm:
    """The runner's state between its start and its run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.signals = jobrunner.Signals()  # first: a stop that comes early must not be lost
        self.config = read_json(root / "warm.json") or {}
        self.sock: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.job_dir: Path | None = None  # the run's, once it is handed one
        self._held: bytes | None = None  # an answer held until the model starts (`answer`)

    def prepare(self) -> None:
        """Lower the memory limit, import the preloads, bind the socket."""
        jobrunner.set_limits(self.config.get("memory_bytes"), None)
        if self.config.get("fork"):
            cwd = self.config["cwd"]
            os.chdir(cwd)
            sys.path[0] = _script_dir(self.config["argv"], cwd)
            for name in self.config.get("preload", []):
                importlib.import_module(name)
        # What is imported now is shared with every fork, the model's and a sibling's:
        # the collector leaves it alone, so forks do not copy its pages to visit it.
        gc.collect()
        gc.freeze()
        self.bind()

    def bind(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with processes.unix_address(self.root / SOCKET) as address:
            self.sock.bind(address)
            os.chmod(address, 0o600)
        self.sock.listen(64)  # a burst of refills may ask it for siblings at once

    def wait(self) -> Path | None:
        """The staging directory the submitter names, or None if told to stop first; asked
        for a sibling meanwhile, forks one (`fork`) and waits on (in both processes)."""
        while True:
            assert self.sock is not None
            got = self.signals.wait(3600, also=(self.sock.fileno(),))
            if got & set(jobrunner.STOP):
                return None
            try:
                self.sock.setblocking(False)
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            with contextlib.suppress(OSError, ValueError):
                conn.settimeout(_HAND_TIMEOUT_S)
                line = conn.makefile("rb").readline(4096).strip()
                if not line:  # it went without a word
                    conn.close()
                    continue
                if line.startswith(FORK):
                    self.fork(conn, Path(os.fsdecode(line[len(FORK) :])))
                    conn.close()
                    continue
                break
            conn.close()  # it went, or said nothing in time: not our run
        self.conn = conn
        self.sock.close()  # one run: nobody else gets in
        (self.root / SOCKET).unlink(missing_ok=True)
        staging = Path(os.fsdecode(line))
        if staging.parent != Path(self.config["jobs"]) or not staging.is_dir():
            sys.stderr.write(f"warmrunner: {staging} is not a job being submitted\n")
            return None
        return staging

    def fork(self, conn: socket.socket, root: Path) -> None:
        """Start a sibling warm runner in `root` (a directory beside ours holding its
        warm.json); it answers `ready <pid>` on `conn` once it waits, or nothing if it
        could not start (the asker then starts one the usual way)."""
        if root.parent != self.root.parent or not (root / "warm.json").is_file():
            sys.stderr.write(f"warmrunner: {root} is not a warm runner's directory\n")
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:  # us: the go-between exits at once, leaving the sibling to init
            os.waitpid(pid, 0)
            return
        try:
            if os.fork():
                os._exit(0)
            self._become(root)
            conn.sendall(b"%s %d\n" % (READY.strip(), os.getpid()))
            if conn.makefile("rb").readline(16) != FORKED:
                os._exit(0)  # the asker gave up on us: nobody would know that we wait
            conn.close()
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        # the sibling goes on in our caller's loop, waiting on its own socket

    def _become(self, root: Path) -> None:
        """Turn this fresh fork into the warm runner of `root`: its session, signal pipe,
        log and socket."""
        os.setsid()
        old = self.signals.fds
        self.signals = jobrunner.Signals()
        assert self.sock is not None
        self.sock.close()
        for fd in old:
            os.close(fd)
        with processes.open_log(root / "warm.log") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        self.root = root
        self.config = read_json(root / "warm.json") or self.config
        if self.config.get("fork"):  # a spec without a workdir runs in the runner's directory
            os.chdir(self.config["cwd"])
            sys.path[0] = _script_dir(self.config["argv"], self.config["cwd"])
        self.bind()

    def answer(self, data: bytes) -> None:
        """Answer the submitter on the socket; a claimed run's runner.log takes our stderr.

        `claimed` is held back until the model has started (`started`: then the answer
        is `running`, so the submitter may report the run running without waiting for
        the watcher) or until the run ended without starting (`flush`).
        """
        if data == jobrunner.CLAIMED:
            if self.job_dir is not None:
                with (
                    contextlib.suppress(OSError),
                    processes.open_log(self.job_dir / "runner.log") as f,
                ):
                    os.dup2(f.fileno(), 2)
            os.dup2(2, 1)
            self._held = data
            return
        self._send(data)

    def started(self) -> None:
        """The model has started: tell the submitter, which is waiting for it."""
        self._held = None
        self._send(jobrunner.RUNNING)

    def flush(self) -> None:
        """Send a held answer (the run was claimed, and ended before its model started)."""
        if self._held is not None:
            self._send(self._held)

    def _send(self, data: bytes) -> None:
        assert self.conn is not None
        if self.conn.fileno() < 0:
            return
        with contextlib.suppress(OSError):
            self.conn.sendall(data)
        self.conn.close()
        os.dup2(2, 1)
        shutil.rmtree(self.root, ignore_errors=True)  # no warm runner's any more: ours to remove

    def start_forked(
        self, job: JobDir, spec: dict
    ) -> tuple[jobrunner.Forked, processes.Process, jobrunner.Output]:
        """Fork the model from this runner (`_child`): its handle, record and output."""
        if not Path(spec["cwd"]).is_dir():
            raise processes.SpawnError(f"the app's working directory {spec['cwd']} does not exist")
        if spec["argv"] != self.config["argv"]:  # the app changed since: run what it says now
            return jobrunner.start_exec(job, spec)
        read, write = os.pipe2(os.O_CLOEXEC)
        set_up, setting_up = os.pipe2(os.O_CLOEXEC)  # ends once the child has closed its fds
        stdin = os.open(job.inputs, os.O_RDONLY | os.O_CLOEXEC)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            held = (self.conn.fileno(),) if self.conn is not None else ()  # the submitter's
            _child(spec, stdin, write, (read, set_up, setting_up, *self.signals.fds, *held))
        for fd in (write, stdin, setting_up):
            os.close(fd)
        # The model is "running" once it has its session and signals: a cancel that
        # follows at once then reaches it as it would a cold run's.
        os.read(set_up, 1)
        os.close(set_up)
        log = CappedLog(job.log, int(spec.get("max_log_bytes") or jobrunner.DEFAULT_LOG_BYTES))
        return jobrunner.Forked(pid), processes.current(pid), jobrunner.Output(read, log)


def run(root: Path) -> int:
    """Wait for a run, then run it as its job runner; the runner's exit code."""
    warm = _Warm(root)
    if not warm.config:
        sys.stderr.write(f"warmrunner: {root}/warm.json is missing or unreadable\n")
        return 1
    warm.prepare()
    os.write(1, READY)
    staging = warm.wait()
    if staging is None:
        return 0
    job_dir = (read_json(staging / "job.json") or {}).get("job_dir")
    warm.job_dir = Path(job_dir) if job_dir else None
    start = warm.start_forked if warm.config.get("fork") else jobrunner.start_exec
    try:
        return jobrunner.run(
            staging, signals=warm.signals, answer=warm.answer, start=start, started=warm.started
        )
    finally:
        warm.flush()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m dispatcher.backends.local.warmrunner <dir>\n")
        return 2
    return run(Path(args[0]).resolve())


if __name__ == "__main__":
    sys.exit(main())
