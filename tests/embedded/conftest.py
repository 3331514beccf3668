"""`spinyard up` as a user runs it: a subprocess in a session of its own, as a terminal's
foreground job is, so a test can signal its whole process group as Ctrl-C does."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, free_port


def _start(data, extra_env: dict[str, str]) -> dict:
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
        "--apps",
        str(ROOT / "examples" / "hello"),
        "--apps",
        str(ROOT / "examples" / "epidemic"),
    ]
    with open(data / "up.log", "wb") as log:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            start_new_session=True,
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


@pytest.fixture(scope="module")
def launch_up(tmp_path_factory):
    """A function that starts `spinyard up` (extra `SPINYARD_*` settings as keywords) and
    returns its process, URL, token, banner and data dir; whatever still runs at the end
    of the module is killed, process group and all."""
    started = []

    def launch(**extra_env: str) -> dict:
        stack = _start(tmp_path_factory.mktemp("up"), extra_env)
        started.append(stack)
        return stack

    yield launch
    for stack in started:
        proc = stack["proc"]
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
