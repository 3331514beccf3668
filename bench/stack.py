"""The pieces a bench starts and stops: nats-server, handler processes, the raw NATS peer.

Everything binds 127.0.0.1 on a port the OS picks, lives under one temporary
directory, and is stopped by the bench (SIGTERM, then SIGKILL after a grace)
when it ends, passes or fails. Handlers run as `python -m dispatcher.cli
handlers ...` in their own process, configured only through `SPINYARD_*`
variables, as in production.
"""

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from dispatcher import waits
from dispatcher.backends import launch
from dispatcher.backends.local.backend import LocalBackend
from dispatcher.backends.settings import LocalBackendSettings
from schemas.spec import AppSpec

ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE_S = 10.0


class BenchError(RuntimeError):
    """A bench could not run: a part did not start, or something it needs is missing."""


async def wait_until(
    predicate: Callable[[], Awaitable[object] | object],
    timeout: float,
    what: str,
    interval: float = 0.02,
) -> object:
    """`dispatcher.waits.until`, failing the bench (BenchError) when it times out."""
    try:
        return await waits.until(predicate, timeout, interval_s=interval, what=what)
    except TimeoutError as exc:
        raise BenchError(str(exc)) from None


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    """Our environment without the caller's SPINYARD_* settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINYARD_")}
    return env | {"PYTHONUNBUFFERED": "1"} | extra


def spinyard_env(nats_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """SPINYARD_* settings for a handler process; `extra` keys are appended after SPINYARD_."""
    env = {
        "SPINYARD_NATS__URL": nats_url,
        "SPINYARD_DATA_DIR": str(data_dir),
        "SPINYARD_GATEWAY__PUBLIC_URL": "http://127.0.0.1:9",  # no gateway: URLs are not opened
        "SPINYARD_LOG_LEVEL": "warning",
        "SPINYARD_LOG_FORMAT": "json",
    }
    return clean_env(env | {f"SPINYARD_{k.upper()}": v for k, v in extra.items()})


class Process:
    """A child process logging to a file, stopped with SIGTERM then SIGKILL."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], log_path: Path, group: bool = False
    ):
        self.name, self.argv, self.env, self.log_path = name, argv, env, log_path
        self.group = group  # own session: stop signals the whole group (worker pools)
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Process":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=self.group,
            )
        return self

    def check(self) -> None:
        """Raise BenchError if the process has exited."""
        if self.proc is not None and self.proc.poll() is not None:
            raise BenchError(
                f"{self.name} exited with {self.proc.returncode}; last log lines:\n{self.tail()}"
            )

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        if self.group:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
        elif self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM (the group, if `group`), SIGKILL after `grace_s`; wait for it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait()
        if self.group:  # children left behind by a parent that exited
            self._signal(signal.SIGKILL)


def handlers_process(
    kinds: list[str], nats_url: str, data_dir: Path, log_dir: Path, **settings: str
) -> Process:
    """`spinyard handlers <kinds>` as a subprocess (not started yet)."""
    argv = [sys.executable, "-m", "dispatcher.cli", "handlers", *kinds]
    env = spinyard_env(nats_url, data_dir, **settings)
    return Process("spinyard handlers", argv, env, log_dir / "handlers.log")


async def consumers_waiting(js: JetStreamContext, stream: str, durables: list[str]) -> bool:
    """Whether each durable exists and has a pull request waiting (its loop is running)."""
    for durable in durables:
        try:
            info = await js.consumer_info(stream, durable)
        except NotFoundError:
            return False
        if not info.num_waiting:
            return False
    return True


async def wait_consumers(
    js: JetStreamContext, stream: str, durables: list[str], proc: Process, timeout: float = 30.0
) -> None:
    """Wait until `proc`'s consumers are pulling; BenchError if it dies or takes too long."""

    async def ready() -> bool:
        proc.check()
        return await consumers_waiting(js, stream, durables)

    await wait_until(ready, timeout, f"{proc.name} consumers {durables} to pull", interval=0.05)


async def stop_instances(data_dir: Path, state_dir: Path | None = None) -> int:
    """Stop every app instance and job the local backend started under `data_dir` (its
    `state_dir`, if the handlers had one).

    The handler process leaves instances running when it stops (by design, so
    a restart finds them); the bench must not.
    """
    settings = LocalBackendSettings(stop_grace_s=2.0, state_dir=state_dir)
    backend = LocalBackend(settings, data_dir, "http://127.0.0.1:9")
    await backend.setup()
    instances = await backend.list_instances()
    for instance in instances:
        if instance.kind in ("viz", "warm"):  # warm: a job app's warm runner
            await backend.stop_viz(instance.id)
        else:
            with contextlib.suppress(NotImplementedError):
                await backend.cancel_job(instance.id)
    await backend.cleanup()
    return len(instances)


def free_port() -> int:
    """A port free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def app_alone(spec: AppSpec, n: int, poll_s: float = 0.005) -> list[float]:
    """Seconds from spawning a viz app's command directly (no spinyard) to its readiness
    path answering below 500, polled every `poll_s`; `n` times, one after another.

    This is the app's own start-up time, which any cold start includes.
    """
    took = []
    async with aiohttp.ClientSession() as http:
        for _ in range(n):
            port, prefix = free_port(), "/alone/"
            values = launch.viz_values(
                port=port, prefix=prefix, host="127.0.0.1", python=sys.executable
            )
            argv = launch.argv(spec, values)
            env = clean_env({"SPINYARD_PORT": str(port), "SPINYARD_PREFIX": prefix})
            url = f"http://127.0.0.1:{port}{prefix.rstrip('/')}{spec.readiness_path}"
            quiet = subprocess.DEVNULL
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, cwd=spec.workdir, env=env, stdout=quiet, stderr=quiet)
            try:
                async with asyncio.timeout(spec.start_timeout_s):
                    while True:
                        with contextlib.suppress(aiohttp.ClientError):
                            async with http.get(url, allow_redirects=False) as resp:
                                if resp.status < 500:
                                    break
                        if proc.poll() is not None:
                            raise BenchError(f"{argv} exited with {proc.returncode}")
                        await asyncio.sleep(poll_s)
                took.append(time.perf_counter() - t0)
            finally:
                proc.terminate()
                proc.wait()
    return took
