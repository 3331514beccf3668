"""A Python model forked from a warm runner (`warmrunner.py`): which commands are forked,
and what the forked child does to become the run's model.

A run is forked when the spec's command is `{python} script.py ...` or
`{python} -m module ...` (`forks`). The child makes a session of its own,
reseeds numpy's generator if a preload imported numpy, takes the run's
stdin, output pipe, cwd, limits and environment, and runs the script or
module as `__main__` with runpy, as `python` would (`child`). Like the
runner it imports nothing of spinyard but the job runner's modules.
"""

import atexit
import contextlib
import os
import runpy
import signal
import sys
import threading
import traceback

from dispatcher.backends.local import jobrunner


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
