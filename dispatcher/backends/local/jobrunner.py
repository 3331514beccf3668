"""The job runner: the process that supervises one run of a job app on this machine.

`LocalBackend.submit_job` prepares a job's directory (`jobfiles.py`) and
starts `python -m dispatcher.backends.local.jobrunner <dir>` in a new
session (`staging.start_runner`), so a crashed handler process does not take runs
with it. The runner holds no credentials (its environment has no SPINYARD_*
variable) and imports nothing of spinyard but `processes`, `jobfiles` and `joblog`,
so it starts quickly (docs/benchmarks.md). It starts the model, enforces
the deadline, records the outcome and tells the backend's watcher
(`jobwatch.py`) when the model starts and when it ends.

What a run gets (the Kubernetes backend mounts the same files from a Secret):

    environment   the handler's environment without any SPINYARD_* variable, then
                  `launch.job_env`: the spec's `env` filled, SPINYARD_JOB_ID, SPINYARD_APP,
                  SPINYARD_INPUTS, SPINYARD_UPLOADS and SPINYARD_OUTPUT_DIR (the
                  job directory's inputs.json, uploads.json and work/) and SPINYARD_DEADLINE_S
    stdin         the contents of inputs.json
    cwd           the spec's `workdir`, if set (so relative script paths work), else
                  SPINYARD_OUTPUT_DIR
    argv          the spec's `command`, "{python}" replaced by the configured interpreter

The run uploads each declared output itself with an HTTP PUT to its URL;
that is its only access to storage. Its stdout and stderr go through a
pipe to job.log, which the runner keeps under the spec's `max_log_bytes`,
dropping the oldest output (`joblog.py`). Limits, where the OS allows:
RLIMIT_AS of `resources.memory` (address space, so a runtime that reserves
much more than it uses may need a higher value than on Kubernetes), and
RLIMIT_CPU of `resources.cpu` x `deadline_s` CPU-seconds per process, which
is all the CPU time a run throttled to `cpu` cores could use before its
deadline (SIGXCPU, then SIGKILL 5 s later; a run stopped so ends
`timed_out`). The deadline counts from the submission.

A run's processes are the runner's whole process tree: the runner makes
itself a child subreaper (prctl PR_SET_CHILD_SUBREAPER), so a process that
leaves the model's group with setsid() and loses its parent is adopted by
the runner rather than by init. At the deadline or on cancel the model's
group and every process below the runner get SIGTERM, then SIGKILL after
the grace; when the model exits, whatever is left below the runner is
killed. Out of reach: processes left behind by a runner that was itself
killed (they go to init), and memory beyond one process's address space
(the local backend has no cgroups).

Submitting takes no lock: the backend fills a directory of a temporary name,
starts a runner on it and waits for its answer on the runner's stdout. The
runner writes runner.json, then claims the job by renaming the directory to
`<job_id>`; if that exists, another runner has the job, and this one
removes its copy and exits. So any number of submissions start one run,
and a submitter that hangs keeps no other waiting.
"""

import contextlib
import errno
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from dispatcher.backends.local import processes
from dispatcher.backends.local.jobfiles import JobDir, notify, read_json
from dispatcher.backends.local.joblog import CappedLog

CPU_KILL_AFTER_S = 5  # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL this much later
STOP = (signal.SIGTERM, signal.SIGINT)  # what tells the runner to cancel its run
CLAIMED, EXISTS = b"claimed\n", b"exists\n"  # what a runner tells its submitter
RUNNING = b"running\n"  # what a warm runner tells its submitter once the model has started
CODE_ROOT = Path(__file__).resolve().parents[3]  # where `-m dispatcher...` is found
_CHUNK = 64 * 1024  # bytes of the model's output read at once
DEFAULT_LOG_BYTES = 10 * 2**20  # a job.json written before the spec had max_log_bytes


# -- the runner process --


class Signals:
    """Signals as bytes on a pipe, so one select() waits for them, the model, its output and the
    deadline."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for sig in (*STOP, signal.SIGCHLD):
            signal.signal(sig, lambda *_: None)

    @property
    def fds(self) -> tuple[int, int]:
        """The pipe's two ends (a forked model closes them)."""
        return self._read, self._write

    def wait(
        self, timeout: float, output: "Output | None" = None, also: tuple[int, ...] = ()
    ) -> set[int]:
        """The signals received within `timeout` seconds (empty if none); meanwhile the model's
        output, if there is some to read, goes to its log (and the wait ends early, as it does
        when one of the `also` fds is readable)."""
        fds = [self._read, *also] + ([output.fd] if output is not None and output.open else [])
        ready, _, _ = select.select(fds, [], [], max(0.0, timeout))
        if output is not None and output.open and output.fd in ready:
            output.pump()
        got: set[int] = set()
        while self._read in ready:
            try:
                data = os.read(self._read, 512)
            except BlockingIOError:
                break
            got.update(data)
        return got


class Output:
    """The model's stdout and stderr: a pipe the runner copies into the run's capped log."""

    def __init__(self, fd: int, log: CappedLog) -> None:
        self.fd, self.log, self.open = fd, log, True
        os.set_blocking(fd, False)

    def pump(self) -> None:
        """Copy what is there to read (up to 1 MiB, so signals are not kept waiting)."""
        for _ in range(16):
            try:
                data = os.read(self.fd, _CHUNK)
            except BlockingIOError:
                return
            if not data:
                self.close()
                return
            self.log.write(data)

    def drain(self, within_s: float) -> None:
        """Copy the rest, until every writer has closed the pipe or `within_s` has passed."""
        ends = time.monotonic() + within_s
        while self.open and (left := ends - time.monotonic()) > 0:
            if select.select([self.fd], [], [], left)[0]:
                self.pump()
        self.close()

    def close(self) -> None:
        if self.open:
            self.open = False
            os.close(self.fd)
            self.log.close()


def _exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (its pid stays its group's until then)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _reap_adopted(model_pid: int) -> None:
    """Reap exited processes the runner adopted as subreaper; the model is left to `popen`."""
    while True:
        try:
            found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if found is None or found.si_pid == model_pid:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(found.si_pid, 0)


def _signal_tree(model: processes.Process, sig: signal.Signals) -> bool:
    """Signal the model's group and every process below the runner (setsid ones included).

    Returns whether anything was left to signal.
    """
    sent = processes.signal_group(model, sig)
    for pid in processes.descendants(os.getpid()):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
            sent = True
    return sent


def set_limits(memory_bytes: int | None, cpu_s: int | None) -> None:
    """In the model's process, before exec: lower (never raise) its resource limits."""
    wanted = [(resource.RLIMIT_AS, memory_bytes, 0), (resource.RLIMIT_CPU, cpu_s, CPU_KILL_AFTER_S)]
    for which, soft, extra in wanted:
        if soft is None:
            continue
        _, hard = resource.getrlimit(which)
        cap = hard if hard != resource.RLIM_INFINITY else soft + extra
        resource.setrlimit(which, (min(soft, cap), min(soft + extra, cap)))


def _model_set_up(limits: tuple[int | None, int | None], nice: int | None) -> None:
    """In the model's process, in its new session, before exec: its limits, and the run's
    niceness for it and its session (`processes.nice_session`)."""
    set_limits(*limits)
    processes.nice_session(0, nice)


def start_exec(job: JobDir, spec: dict) -> tuple[subprocess.Popen, processes.Process, Output]:
    """Start the model by exec'ing its command in a new session: its handle, record and output."""
    limits = (spec.get("memory_bytes"), spec.get("cpu_seconds"))
    cwd = spec["cwd"]
    if not Path(cwd).is_dir():
        raise processes.SpawnError(f"the app's working directory {cwd} does not exist")
    read, write = os.pipe2(os.O_CLOEXEC)
    try:
        with open(job.inputs, "rb") as stdin:
            popen = subprocess.Popen(
                spec["argv"],
                cwd=cwd,
                env=spec["env"],
                stdin=stdin,
                stdout=write,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=lambda: _model_set_up(limits, spec.get("nice")),
            )
    except OSError as exc:
        os.close(read)
        raise processes.SpawnError(
            f"could not run {spec['argv'][0]!r}: {exc.strerror or exc}"
        ) from exc
    finally:
        os.close(write)  # the model's copies are its own: EOF once they are all closed
    log = CappedLog(job.log, int(spec.get("max_log_bytes") or DEFAULT_LOG_BYTES))
    return popen, processes.current(popen.pid), Output(read, log)


def _supervise(
    popen: "subprocess.Popen | Forked",
    model: processes.Process,
    output: Output,
    spec: dict,
    signals: Signals,
) -> tuple[str | None, int]:
    """Wait for the model, copying its output to the log; stop its tree at the deadline or when
    told to; once it has exited, kill whatever it left running.

    The deadline counts from the submission, as a Kubernetes Job's does from its
    start (and the reaper's from the run's `queued`), not from the model's start.

    Returns why it was stopped (None, "timed_out" or "cancelled") and its exit status.
    """
    now = time.monotonic()
    since_submit = max(0.0, time.time() - float(spec["created_at"]))
    deadline, kill_at = now + float(spec["deadline_s"]) - since_submit, math.inf
    why: str | None = None
    while not _exited(popen.pid):
        now = time.monotonic()
        if why is None and now >= deadline:
            why = "timed_out"
        if why is not None and kill_at == math.inf:
            _signal_tree(model, signal.SIGTERM)
            kill_at = now + float(spec["stop_grace_s"])
        elif now >= kill_at:
            _signal_tree(model, signal.SIGKILL)
            kill_at = now + processes.KILL_WAIT_S  # and again, should it not take
        got = signals.wait(min(deadline if why is None else kill_at, now + 60) - now, output)
        if signal.SIGCHLD in got:
            _reap_adopted(popen.pid)
        if why is None and got & set(STOP):
            why = "cancelled"
    if why is None and signals.wait(0) & set(STOP):  # told to stop as it ended (the same
        why = "cancelled"  # SIGTERM to our group, say, before the model had its session)
    # Its group's leftovers, while the model's pid is not free yet; what left the group
    # (setsid) is found below the runner once the model is reaped.
    processes.signal_group(model, signal.SIGKILL)
    status = popen.wait()
    ends = time.monotonic() + processes.KILL_WAIT_S
    while time.monotonic() < ends:
        _reap_adopted(popen.pid)
        if processes.childless_subreaper():  # nothing of the model's is left (see there)
            break
        if not _signal_tree(model, signal.SIGKILL) and not processes.group_runs(model.pid):
            break
        output.pump()  # a process blocked on a full pipe must not outlast its SIGKILL
        time.sleep(processes.POLL_S)
    output.drain(1.0)
    return why, status


class Forked:
    """A model forked by a warm runner, waited for as `subprocess.Popen` would be."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def wait(self) -> int:
        """Its exit status: the exit code, or minus the signal that ended it."""
        _, status = os.waitpid(self.pid, 0)
        return os.waitstatus_to_exitcode(status)


def _outcome(job: JobDir, spec: dict, why: str | None, status: int) -> tuple[str, int]:
    """The run's state and exit code, with a note in its log saying why it ended so."""
    code = status if status >= 0 else 128 - status
    if why == "timed_out":
        job.note(f"the run passed its deadline of {spec['deadline_s']:g} s and was stopped")
    elif why == "cancelled":
        job.note("the run was cancelled")
    elif status == -signal.SIGXCPU:
        why = "timed_out"
        job.note(f"the run used up its CPU time ({spec['cpu_seconds']} s) and was stopped")
    elif status < 0:
        job.note(f"the run was killed by {signal.Signals(-status).name}")
    return why or ("succeeded" if status == 0 else "failed"), code


def _claim(staging: Path, job: JobDir, spec: dict, answer: Callable[[bytes], None]) -> bool:
    """Move `staging` into place as the job's directory, unless the job exists; tell the submitter.

    runner.json goes in first, so whoever finds the job's directory finds its runner.
    """
    record = processes.current(os.getpid())._asdict()
    record |= {"app": spec["app"], "created_at": spec["created_at"]}
    JobDir(job.path.parent, job.id, staging).write("runner.json", record)
    try:
        os.rename(staging, job.path)
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise  # the submitter sees us exit, and why in runner.log
        shutil.rmtree(staging, ignore_errors=True)  # another runner has the job
        answer(EXISTS)
        return False
    answer(CLAIMED)
    return True


def _tell(answer: bytes) -> None:
    """Answer the submitter on stdout, which then goes to runner.log like stderr."""
    with contextlib.suppress(OSError):  # the submitter is gone: the run goes on regardless
        os.write(1, answer)
    os.dup2(2, 1)


def run(
    staging: Path,
    signals: Signals | None = None,
    answer: Callable[[bytes], None] = _tell,
    start: Callable[[JobDir, dict], tuple] = start_exec,
    started: Callable[[], None] = lambda: None,
    spec: dict | None = None,
) -> int:
    """Claim the job prepared in `staging`, then run it to its end; the runner's exit code.

    A warm runner (`warmrunner.py`) passes the signals it set up when it started, answers
    its submitter on its socket, may fork the model rather than exec it (`start`), is
    told when the model has started (`started`, not called if it did not start), and
    passes the job.json it wrote (`spec`).
    """
    signals = signals or Signals()  # first: a cancel that comes early must not be lost
    spec = spec or read_json(staging / "job.json")
    if spec is None:
        sys.stderr.write(f"jobrunner: {staging}/job.json is missing or unreadable\n")
        return 1
    job = JobDir.at(Path(spec["job_dir"]))
    if not _claim(staging, job, spec, answer):
        return 0
    if signals.wait(0) & set(STOP):
        job.note("the run was cancelled before it started")
        job.finish("cancelled", None, None)
        notify(spec["socket"], job.id)
        return 0
    processes.become_subreaper()  # so setsid children of the model stay within reach
    popen = model = None
    try:
        popen, model, output = start(job, spec)
        started()  # (a forked model's runner has said so already: `warmrunner.start_forked`)
        started_at = time.time()
        job.write("model.json", model._asdict() | {"started_at": started_at})
        notify(spec["socket"], job.id)
        why, status = _supervise(popen, model, output, spec, signals)
        state, code = _outcome(job, spec, why, status)
        job.finish(state, code, started_at)
    except processes.SpawnError as exc:
        job.note(str(exc))
        job.finish("failed", None, None)
    except Exception:
        traceback.print_exc()
        if model is not None:
            _signal_tree(model, signal.SIGKILL)
        job.note("the job runner failed; see runner.log")
        job.finish("failed", None, None)
    notify(spec["socket"], job.id)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m dispatcher.backends.local.jobrunner <staging dir>\n")
        return 2
    return run(Path(args[0]).resolve())


if __name__ == "__main__":
    processes.exit_now(main())
