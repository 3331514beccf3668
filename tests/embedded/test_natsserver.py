"""The embedded nats-server: starts on a free port, and never outlives its parent."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dispatcher.embedded.natsserver import NatsServer

PARENT = """
import sys, time
from dispatcher.embedded.natsserver import NatsServer
server = NatsServer(sys.argv[1]).start()
print(server.proc.pid, flush=True)
time.sleep(60)
"""


def test_two_servers_get_different_ports(tmp_path):
    with NatsServer(tmp_path / "a") as a, NatsServer(tmp_path / "b") as b:
        assert a.port != b.port and a.proc.poll() is None


def test_server_dies_when_its_parent_is_killed(tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "nats")], stdout=subprocess.PIPE, text=True
    )
    try:
        child = int(parent.stdout.readline())
        os.kill(child, 0)  # running
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state == "Z":  # exited; only its (killed) parent could have reaped it
                    break
            except (ProcessLookupError, FileNotFoundError):
                break
            time.sleep(0.05)
        else:
            os.kill(child, signal.SIGKILL)
            raise AssertionError("nats-server outlived its killed parent")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        parent.stdout.close()
