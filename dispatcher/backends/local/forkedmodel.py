"""A Python model forked from a warm runner (`warmrunner.py`): which commands are forked,
and what the forked child does to become the run's model.

A run is forked when the spec's command is `{python} script.py ...` or
`{python} -m module ...` (`forks`). The child makes a session of its own,
reseeds numpy's generator if a preload imported numpy, takes the run's
stdin, output pipe, cwd, limits and environment, and runs the script or
module as `__main__` with runpy, as `python` would (`child`). Like the
runner it imports nothing of spinyard but the job runner's modules.

The fork itself is done ahead (`Spare`): while the runner waits for its run,
a process forked from it waits on a pipe for the run's instructions, so the
start of a run costs a write to that pipe, not a fork (a millisecond or two,
more for a runner with much imported). A spare that is gone by then (killed)
is forked afresh at the run's start.
"""

import atexit
import contextlib
import json
import os
import runpy
import signal
import sys
import threading
import traceback

from dispatcher.backends.local import jobrunner, processes


def forks(argv: list[str]) -> bool:
    """Whether a run of `argv` (the spec's command, unfilled) is forked from a warm runner:
    `{python} script.py ...` or `{python} -m module ...`; any other option is exec'd."""
    if len(argv) < 2 or argv[0] != "{python}":
        return False
    return (argv[1] == "-m" and len(argv) > 2) or not argv[1].startswith("-")


def script_dir(argv: list[str], cwd: str) -> str:
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
    sys.path[0] = script_dir(argv, os.getcwd())
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


def child(spec: dict, stdin: int, out: int, closing: tuple[int, ...]) -> None:
    """The forked model: a session, stdio, cwd, limits and environment of its own; never
    returns."""
    code = 1
    try:
        os.setsid()
        processes.nice_session(0, spec.get("nice"))  # the run's niceness, session and all
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


class Spare:
    """A process forked from a warm runner ahead of its run, waiting to become its model.

    It holds the write end of the model's output pipe (`out` is the read end)
    and of a pipe it closes once it has closed the runner's files (`set_up`,
    as `child` does); `go` is where the run's instructions go, and closing it
    unsent ends the spare (so does the runner's exit).
    """

    def __init__(self, pid: int, go: int, out: int, set_up: int) -> None:
        self.pid, self.go, self.out, self.set_up = pid, go, out, set_up

    @classmethod
    def fork(cls, closing: tuple[int, ...]) -> "Spare":
        """Fork a spare; it closes `closing` (the runner's socket and signal pipe) at once."""
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        set_up_r, set_up_w = os.pipe2(os.O_CLOEXEC)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _wait_for_run(go_r, out_w, set_up_w, (go_w, out_r, set_up_r, *closing))
        for fd in (go_r, out_w, set_up_w):
            os.close(fd)
        return cls(pid, go_w, out_r, set_up_r)

    def start(self, spec: dict, stdin: str) -> bool:
        """Hand it the run (job.json's `spec`, the inputs' path); False if it is gone."""
        data = json.dumps({"spec": spec, "stdin": stdin}).encode()
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.go, view) :]
        except OSError:  # it died waiting (EPIPE)
            self.drop()
            return False
        os.close(self.go)
        return True

    def drop(self) -> None:
        """Close our ends (the spare, if alive, then ends) and reap it if it has ended."""
        for fd in (self.go, self.out, self.set_up):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, os.WNOHANG)


def _wait_for_run(go: int, out: int, set_up: int, closing: tuple[int, ...]) -> None:
    """The spare: wait for the run's instructions on `go`, then become its model (`child`);
    never returns. Nothing sent (the runner closed `go`, or ended): it exits."""
    try:
        for fd in closing:
            with contextlib.suppress(OSError):
                os.close(fd)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a stop of the runner's group ends it
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        chunks = []
        while chunk := os.read(go, 1 << 16):
            chunks.append(chunk)
        os.close(go)
        if not chunks:
            os._exit(0)
        run = json.loads(b"".join(chunks))
        stdin = os.open(run["stdin"], os.O_RDONLY | os.O_CLOEXEC)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    child(run["spec"], stdin, out, (set_up,))
