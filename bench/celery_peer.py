"""Celery with a Redis broker: the setup Compute Studio moved away from, as the runs peer.

The same module is the worker's app (`celery -A bench.celery_peer worker`,
broker URL from BENCH_CELERY_REDIS) and the bench's client. `measure` starts
Debian's redis-server on a free loopback port (no persistence), a prefork
worker with concurrency 2 (one per core, the usual deployment) in its own
process group, and times a trivial task that returns `time.time()` when it
starts. Submit and start times are both read from this machine's wall
clock. Everything it starts is stopped before it returns.
"""

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from celery import Celery

from bench import stats
from bench.stack import BenchError, Process, clean_env, free_port

URL_ENV = "BENCH_CELERY_REDIS"
WORKER = "prefork pool, concurrency 2, without gossip/mingle/heartbeat"
TIMEOUT_S = 60.0

app = Celery("bench_celery_peer")
app.conf.update(
    broker_url=os.environ.get(URL_ENV, "redis://127.0.0.1:6379/0"),
    result_backend=os.environ.get(URL_ENV, "redis://127.0.0.1:6379/0"),
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
)


@app.task(name="bench.trivial")
def trivial(submitted: float) -> float:
    """The trivial task: note when it started and return it."""
    return time.time()


@dataclass(frozen=True)
class Sizes:
    runs: int = 200
    burst: int = 200
    warmup: int = 10


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    """A redis-server on loopback without persistence; yields its URL, stops it after."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server not found: apt-get install -y redis-server")
    import redis

    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(tmp), "--daemonize", "no"]
    proc = Process("redis-server", argv, clean_env({}), tmp / "redis.log").start()
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + 10
        while True:
            proc.check()
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            if time.monotonic() > deadline:
                raise BenchError(f"redis-server did not answer on port {port}")
            time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.stop()


@contextlib.contextmanager
def worker(url: str, tmp: Path) -> Iterator[Process]:
    """A Celery worker subprocess on `url`, in its own process group."""
    argv = [sys.executable, "-m", "celery", "-A", "bench.celery_peer", "worker"]
    argv += ["--pool", "prefork", "--concurrency", "2", "--loglevel", "WARNING"]
    argv += ["--without-gossip", "--without-mingle", "--without-heartbeat", "-n", "bench@%h"]
    proc = Process("celery worker", argv, clean_env({URL_ENV: url}), tmp / "worker.log", True)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


def _sequential(n: int) -> tuple[list[float], list[float]]:
    """(submit -> start, submit -> result) of `n` tasks, one after another, in seconds."""
    starts, results = [], []
    for _ in range(n):
        t0 = time.time()
        started = trivial.apply_async((t0,)).get(timeout=TIMEOUT_S)
        results.append(time.time() - t0)
        starts.append(started - t0)
    return starts, results


def _burst(n: int) -> list[dict]:
    """Rates for `n` tasks submitted at once: submitted, started, results received."""
    t0 = time.time()
    pending = [trivial.apply_async((t0,)) for _ in range(n)]
    submitted = time.time() - t0
    started = [r.get(timeout=TIMEOUT_S) for r in pending]
    done = time.time() - t0
    for r in pending:
        r.forget()
    return [
        stats.rate("submitted (apply_async returned)", n, submitted),
        stats.rate("started (task body began)", n, max(started) - t0),
        stats.rate("completed (results received)", n, done),
    ]


def measure(sizes: Sizes) -> dict:
    """Start redis and a worker, time the trivial task, stop both. Rows in ms and per s."""
    with tempfile.TemporaryDirectory(prefix="spinyard-bench-celery-") as tmp:
        with redis_server(Path(tmp)) as url, worker(url, Path(tmp)) as proc:
            app.conf.update(broker_url=url, result_backend=url)
            try:
                deadline = time.monotonic() + TIMEOUT_S
                while True:  # the first tasks wait until the worker has started
                    proc.check()
                    with contextlib.suppress(Exception):
                        trivial.apply_async((time.time(),)).get(timeout=1.0)
                        break
                    if time.monotonic() > deadline:
                        raise BenchError(f"the celery worker did not run a task:\n{proc.tail()}")
                _sequential(sizes.warmup)
                starts, results = _sequential(sizes.runs)
                rates = _burst(sizes.burst)
                proc.check()
            finally:
                app.close()
    return {
        "worker": WORKER,
        "broker": "redis-server (Debian), loopback, --save '' --appendonly no",
        "latency": [
            stats.latency("submit -> task start", starts),
            stats.latency("submit -> result received", results),
        ],
        "rates": rates,
    }
