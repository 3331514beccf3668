"""`spinyard up` as a user runs it: a subprocess in a session of its own, as a terminal's
foreground job is, so a test can signal its whole process group as Ctrl-C does.

Used by tests/embedded and tests/browser through the `launch_up` fixture (tests/conftest.py).
"""

import ctypes
import os
import re
import signal
import subprocess
import sys
import time

from tests.backends.local.procs import kill_left_processes
from tests.helpers import ROOT, free_port

EXAMPLES = (ROOT / "examples" / "hello", ROOT / "examples" / "epidemic")
PR_SET_PDEATHSIG = 1


def _ends_with_pytest() -> None:
    """In the child: SIGTERM when the test process dies, so a killed run leaves no stack.

    (A stack's own shutdown on SIGTERM stops everything it started.)
    """
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def start_up(data, extra_env: dict[str, str], apps=EXAMPLES, args: tuple[str, ...] = ()) -> dict:
    """Start `spinyard up` with the spec dirs `apps`, settings `extra_env` and more command
    line `args`; wait for its banner. Returns its process, URL, token, banner, data dir
    and log file (appended to, so a data dir can serve several runs)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINYARD_")}
    env |= {
        "SPINYARD_DATA_DIR": str(data),
        "SPINYARD_REAPER__INTERVAL_S": "0.5",
        "SPINYARD_LOG_FORMAT": "json",
    } | extra_env
    argv = [
        sys.executable,
        "-m",
        "dispatcher.cli",
        "up",
        "--port",
        str(port),
        *(arg for path in apps for arg in ("--apps", str(path))),
        *args,
    ]
    with open(data / "up.log", "ab") as log:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
            preexec_fn=_ends_with_pytest,
        )
    banner = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        banner.append(line)
        if line.startswith("Press Ctrl-C"):
            break
    text = "".join(banner)
    if "token:" not in text:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        raise AssertionError(
            f"spinyard up did not start:\n{text}\n{(data / 'up.log').read_text()[-3000:]}"
        )
    return {
        "proc": proc,
        "url": f"http://127.0.0.1:{port}",
        "token": re.search(r"token:\s+(\S+)", text).group(1),
        "banner": text,
        "data": data,
        "log": data / "up.log",
    }


def stop_up(stack: dict) -> None:
    """Stop a stack as a user does (SIGTERM: it stops its apps and runs, then itself), or
    kill it, process group and all, if that takes over 30 s; then kill any app or run
    still running under its data dir (they have sessions of their own: a killed stack
    leaves them behind)."""
    proc = stack["proc"]
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    proc.stdout.close()
    kill_left_processes(stack["data"])
