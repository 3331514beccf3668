"""The warm runner: a job runner started ahead for an app's pool, waiting for its run.

`LocalBackend.start_warm` (`warm.py`) starts `python -m
dispatcher.backends.local.warmrunner <dir>` in a new session, in a directory
of its own, `<state_dir>/warm/<instance>/` (0700):

    warm.json   what it was started for: app, argv, cwd, preload, fork, memory_bytes, jobs
                (and, for the backend only, what decides who may fork it: `warm.py`)
    sock        the unix stream socket it waits on (0600)
    warm.log    its stderr until it has a run (then the run's runner.log)

The runner removes the directory itself once it has answered its run.

It runs with the app's environment as a cold runner's model would have it
without the run's own variables: the handler's environment minus every
SPINYARD_* variable (no credentials), then the spec's `env`. Its address
space is limited to the app's `resources.memory` (a forked run inherits it,
so what it preloads counts toward the run's memory). It waits at the
handler's niceness, as its hand-over is on the start's way; once it has
answered, it lowers itself and its session to the run's niceness (job.json's
`nice`), as the model does (`processes.nice_session`). For a Python model
(`fork`: a command of `{python} script.py ...` or `{python} -m module ...`)
it changes to the app's workdir, puts the script's directory first on
`sys.path` as Python would, and imports each `preload` module. Then it
binds its socket and writes `ready` on stdout.

A run comes as `run <n>` on the socket and n bytes of JSON (`run_message`):
its inputs, upload URLs and the instructions a cold start writes to
job.json (whose job directory, under the runner's jobs directory, names
the job). The runner writes the job's files itself in a staging directory
beside the job's, as the backend does for a cold start, so the handler's
event loop has no file work on the start's path; from then on it
is that job's runner (`jobrunner.run`): it claims the job (the rename that
makes any number of submissions start one run) and starts the model, then
answers on the socket: `running` as soon as the model's process is there
(forked, or exec'd), before its record and set-up (`exists` if another
runner has the job; `claimed` if the model did not start, which the run's
result then tells). A Python model is forked from the runner
(`forkedmodel.py`), ahead: the runner forks its spare once it waits
(`forkedmodel.Spare`), which waits on a pipe for the run's instructions, so
the start costs a write, not a fork. The child makes a session of its own,
takes the run's environment, cwd, stdin, limits and `sys.argv`, and runs
the script with runpy, so the preloaded modules are imported already; any
other command is exec'd as a cold runner does (the runner's own start is
saved).
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

import contextlib
import gc
import importlib
import json
import os
import shutil
import socket
import sys
import traceback
from pathlib import Path
from typing import BinaryIO

from dispatcher.backends.local import forkedmodel, jobrunner, processes
from dispatcher.backends.local.jobfiles import JobDir, fill, read_json
from dispatcher.backends.local.joblog import CappedLog
from schemas.names import JOB_ID_RE

READY = b"ready\n"  # what a warm runner writes on stdout once it waits for a run
RUN = b"run "  # what hands a waiting runner its run: `run <n>`, then n bytes of JSON
FORK = b"fork "  # what asks a waiting runner for a sibling: `fork <dir>`
FORKED = b"ok\n"  # the asker's word that it recorded the sibling's `ready <pid>`
SOCKET = "sock"
_HAND_TIMEOUT_S = 5.0  # how long a connected submitter may take to send its run
_MAX_RUN_BYTES = 16 * 2**20  # a run's message: inputs (at most 1 MiB packed), URLs, job.json


def run_message(inputs: dict, upload_urls: dict, spec: dict) -> bytes:
    """What hands a runner its run: its inputs, upload URLs and instructions (job.json's,
    `staging.job_instructions`, which name the job's directory and so its id)."""
    body = {"inputs": inputs, "uploads": upload_urls, "job": spec}
    data = json.dumps(body).encode()
    return RUN + b"%d\n" % len(data) + data


def _read_run(reader: BinaryIO, line: bytes) -> dict | None:
    """The run a `run <n>` line announces, read on; None if it is not one."""
    size = line[len(RUN) :]
    if not size.isdigit() or int(size) > _MAX_RUN_BYTES:
        return None
    data = reader.read(int(size))
    if len(data) != int(size):
        return None
    try:
        run = json.loads(data)
    except ValueError:
        return None
    return run if isinstance(run, dict) else None


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
        self.spare: forkedmodel.Spare | None = None  # its model-to-be, forked ahead
        self.nice: int | None = None  # the run's niceness (job.json's), once it has a run

    def prepare(self) -> None:
        """Lower the memory limit, import the preloads, bind the socket."""
        jobrunner.set_limits(self.config.get("memory_bytes"), None)
        if self.config.get("fork"):
            cwd = self.config["cwd"]
            os.chdir(cwd)
            sys.path[0] = forkedmodel.script_dir(self.config["argv"], cwd)
            for name in self.config.get("preload", []):
                importlib.import_module(name)
        # What is imported now is shared with every fork, the model's and a sibling's:
        # the collector leaves it alone, so forks do not copy its pages to visit it.
        gc.collect()
        gc.freeze()
        self.bind()
        self.fork_spare()

    def fork_spare(self) -> None:
        """Fork the next run's model ahead, for a Python model (`forkedmodel.Spare`)."""
        if self.config.get("fork"):
            assert self.sock is not None
            self.spare = forkedmodel.Spare.fork((self.sock.fileno(), *self.signals.fds))

    def bind(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with processes.unix_address(self.root / SOCKET) as address:
            self.sock.bind(address)
            os.chmod(address, 0o600)
        self.sock.listen(64)  # a burst of refills may ask it for siblings at once

    def wait(self) -> dict | None:
        """The run the submitter sends (`run_message`), or None if told to stop first or
        sent something else; asked for a sibling meanwhile, forks one (`fork`) and waits
        on (in both processes)."""
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
                reader = conn.makefile("rb")  # the run's JSON is read on from it
                line = reader.readline(4096).strip()
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
        with contextlib.suppress(OSError, ValueError):
            if line.startswith(RUN):
                return _read_run(reader, line)
        return None

    def stage(self, run: dict) -> Path | None:
        """Write the job's files (as `submit_job` would) in a new staging directory beside
        its directory-to-be, which `jobrunner.run` claims; None if `run` names no job
        of ours."""
        jobs, spec = Path(self.config["jobs"]), run.get("job")
        job_dir = Path(str(spec.get("job_dir"))) if isinstance(spec, dict) else None
        if job_dir is None or job_dir.parent != jobs or not JOB_ID_RE.match(job_dir.name):
            sys.stderr.write(f"warmrunner: the run names no job directory in {jobs}\n")
            return None
        staged = JobDir.staging(jobs, job_dir.name)
        try:
            fill(staged, run.get("inputs") or {}, run.get("uploads") or {}, spec)
        except BaseException:
            shutil.rmtree(staged.path, ignore_errors=True)
            raise
        return staged.path

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
            self.fork_spare()  # once the asker has us: a refill does not wait for it
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        # the sibling goes on in our caller's loop, waiting on its own socket

    def _become(self, root: Path) -> None:
        """Turn this fresh fork into the warm runner of `root`: its session, signal pipe,
        log and socket."""
        os.setsid()
        processes.nice_session()  # a new session: as nice as the runner it was forked from
        if self.spare is not None:  # our parent's: its ends are closed here, it is not ours
            self.spare.drop()
            self.spare = None
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
            sys.path[0] = forkedmodel.script_dir(self.config["argv"], self.config["cwd"])
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
        """The model has started: tell the submitter, which is waiting for it (once: a
        forked model's runner says so right after the fork, and `jobrunner.run`'s call
        that follows then finds the connection closed)."""
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
        processes.nice_session(0, self.nice)  # answered: from now on, as nice as the run
        os.dup2(2, 1)
        shutil.rmtree(self.root, ignore_errors=True)  # no warm runner's any more: ours to remove

    def start_forked(
        self, job: JobDir, spec: dict
    ) -> tuple[jobrunner.Forked, processes.Process, jobrunner.Output]:
        """Start the model in this runner's spare (`forkedmodel.Spare`; forked now if the one
        forked ahead died waiting): its handle, record and output."""
        if not Path(spec["cwd"]).is_dir():
            raise processes.SpawnError(f"the app's working directory {spec['cwd']} does not exist")
        if spec["argv"] != self.config["argv"]:  # the app changed since: run what it says now
            return jobrunner.start_exec(job, spec)
        spare, self.spare = self.spare, None
        if spare is None or not spare.start(spec, str(job.inputs)):  # it died waiting
            held = (self.conn.fileno(),) if self.conn is not None else ()  # the submitter's
            spare = forkedmodel.Spare.fork((*self.signals.fds, *held))  # forked now, then
            if not spare.start(spec, str(job.inputs)):
                raise processes.SpawnError("the model's process ended before it had its run")
        self.started()  # its process is there: the submitter need not wait for the rest
        # Supervised once it has its session and signals (it closed `set_up`): a cancel
        # that follows at once then reaches it as it would a cold run's.
        os.read(spare.set_up, 1)
        os.close(spare.set_up)
        log = CappedLog(job.log, int(spec.get("max_log_bytes") or jobrunner.DEFAULT_LOG_BYTES))
        output = jobrunner.Output(spare.out, log)
        return jobrunner.Forked(spare.pid), processes.current(spare.pid), output


def run(root: Path) -> int:
    """Wait for a run, then run it as its job runner; the runner's exit code."""
    warm = _Warm(root)
    if not warm.config:
        sys.stderr.write(f"warmrunner: {root}/warm.json is missing or unreadable\n")
        return 1
    warm.prepare()
    os.write(1, READY)
    given = warm.wait()
    staging = given and warm.stage(given)
    if not staging:
        return 0
    warm.job_dir, warm.nice = Path(given["job"]["job_dir"]), given["job"].get("nice")
    start = warm.start_forked if warm.config.get("fork") else jobrunner.start_exec
    try:
        return jobrunner.run(
            staging,
            signals=warm.signals,
            answer=warm.answer,
            start=start,
            started=warm.started,
            spec=given["job"],
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
    processes.exit_now(main())
