"""The floor under a warm start: its bus round trips in plain nats-py, with nothing else.

A warm run's way from its request to `running` is, on the bus (handlers/run_request.py,
handlers/run_start.py): the request's acked publish; acceptance's KV create beside
the app's spec read; its `queued` status beside the start event; the start's pool
claim (a KV compare-and-set); the hand-over to the waiting runner over a unix
socket and its answer; the run's record written `running` (a compare-and-set
from the revision the start event carried); the `running` status. This module
takes the same steps in three processes of plain nats-py code, with none of
spinyard's (no schemas, logs, metrics, retries, files or process starts), so
the runs bench can say how far a warm start is from the machine's floor for
those steps, measured in the same run:

    python -m bench.chain_peer accept NATS_URL      # acceptance
    python -m bench.chain_peer start NATS_URL SOCK   # the start
    python -m bench.chain_peer runner NATS_URL SOCK  # answers `running` on SOCK

The consumers pull with nats-py's `fetch` (up to 16, 1 s long-poll;
`bench.nats_peer.pull_loop`, the raw peers' loop). SIGTERM stops each.
"""

import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

import nats
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from bench import stats
from bench.nats_peer import pull_loop
from bench.stack import BenchError, Process, clean_env, wait_consumers, wait_until
from dispatcher.embedded.natsserver import NatsServer

EVENTS, STATUS = "CHAIN_EV", "CHAIN_ST"
REQUEST, START = "chain.ev.request", "chain.ev.start"
DURABLES = {"accept": ("chain-accept", REQUEST), "start": ("chain-start", START)}
SPEC = b"s" * 600  # about a job app's packed spec
RECORD = b"r" * 400  # about a queued run's packed record
TIMEOUT_S = 10.0


def status_subject(run: str) -> str:
    return f"chain.st.{run}"


async def setup(js: JetStreamContext) -> None:
    """Streams, KV buckets and consumers shaped like spinyard's."""
    await js.add_stream(
        StreamConfig(
            name=EVENTS,
            subjects=["chain.ev.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=120.0,
        )
    )
    await js.add_stream(
        StreamConfig(
            name=STATUS, subjects=["chain.st.>"], max_msgs_per_subject=1, storage=StorageType.FILE
        )
    )
    for bucket in ("chain-apps", "chain-jobs", "chain-pools"):
        await js.create_key_value(bucket=bucket)
    await (await js.key_value("chain-apps")).put("app", SPEC)
    for durable, subject in DURABLES.values():
        config = ConsumerConfig(
            durable_name=durable,
            filter_subject=subject,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_ack_pending=1000,
        )
        await js.add_consumer(EVENTS, config)


async def accept(js: JetStreamContext, stopping: asyncio.Event) -> None:
    """Record the run beside reading the spec; `queued` beside the start event."""
    jobs, apps = await js.key_value("chain-jobs"), await js.key_value("chain-apps")

    async def handle(msg) -> None:
        run = msg.data.decode()
        revision, _ = await asyncio.gather(jobs.create(run, RECORD), apps.get("app"))
        start = f"{run} {revision}".encode()
        await asyncio.gather(
            js.publish(status_subject(run), b"queued"),
            js.publish(START, start, headers={"Nats-Msg-Id": f"start-{run}"}),
        )

    await pull_loop(js, EVENTS, DURABLES["accept"][0], handle, stopping)


async def start(js: JetStreamContext, sock: str, stopping: asyncio.Event) -> None:
    """Claim from the pool, hand over on the socket, record `running`, say so."""
    jobs, pools = await js.key_value("chain-jobs"), await js.key_value("chain-pools")
    pool = [await pools.put("pool", b"p" * 200)]

    async def handle(msg) -> None:
        run, revision = msg.data.decode().split()
        pool[0] = await pools.update("pool", b"p" * 200, last=pool[0])
        reader, writer = await asyncio.open_unix_connection(sock)
        try:
            writer.write(f"run {run}\n".encode())
            await reader.readline()
        finally:
            writer.close()
        await jobs.update(run, RECORD + b"running", last=int(revision))
        await js.publish(status_subject(run), b"running")

    await pull_loop(js, EVENTS, DURABLES["start"][0], handle, stopping)


def runner(sock: str) -> None:
    """Answer each connection's line with `running` (a warm runner's answer, no fork)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(f"{sock}.tmp")
    server.listen(16)
    os.rename(f"{sock}.tmp", sock)  # there once it listens
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        conn, _ = server.accept()
        with conn:
            conn.makefile("rb").readline()
            conn.sendall(b"running\n")


async def serve(role: str, url: str, sock: str) -> None:
    nc = await nats.connect(url, name=f"bench-chain-{role}")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        if role == "accept":
            await accept(nc.jetstream(), stopping)
        else:
            await start(nc.jetstream(), sock, stopping)
    finally:
        await nc.drain()


def _listening(sock: str, runner: Process) -> bool:
    """Whether the runner has bound its socket (BenchError if it exited)."""
    runner.check()
    return Path(sock).exists()


async def _runs(nc, js: JetStreamContext, procs: list[Process], runs: int, warmup: int) -> dict:
    """Seconds from each request's publish to its `queued` and its `running`."""
    seen: dict[str, dict[str, float]] = {}
    arrived = asyncio.Event()

    async def on_status(msg) -> None:
        run = msg.subject.rsplit(".", 1)[1]
        seen.setdefault(run, {})[msg.data.decode()] = time.perf_counter()
        arrived.set()

    await nc.subscribe(status_subject("*"), cb=on_status)
    took: dict[str, list[float]] = {"queued": [], "running": []}
    for i in range(warmup + runs):
        run = f"r{i}"
        t0 = time.perf_counter()
        await js.publish(REQUEST, run.encode(), headers={"Nats-Msg-Id": run})
        async with asyncio.timeout(TIMEOUT_S):
            while len(seen.get(run, {})) < len(took):
                arrived.clear()
                await arrived.wait()
        if i >= warmup:
            for state in took:
                took[state].append(seen[run][state] - t0)
        await asyncio.sleep(0.005)
        for proc in procs:
            proc.check()
    return took


async def measure(runs: int, warmup: int = 5) -> list[dict]:
    """Latency rows: request -> queued and -> running, `runs` one after another (each
    waits for both statuses, then 5 ms: the rest of a run's life)."""
    with tempfile.TemporaryDirectory(prefix="spinyard-bench-chain-") as tmp:
        tmp_path = Path(tmp)
        procs: list[Process] = []
        async with contextlib.AsyncExitStack() as stack:
            server = NatsServer(tmp_path / "nats").start()
            stack.callback(server.stop)
            nc = await nats.connect(server.url, name="bench-chain")
            stack.push_async_callback(nc.close)
            js = nc.jetstream()
            await setup(js)
            sock = str(tmp_path / "runner.sock")
            for role in ("runner", "accept", "start"):
                argv = [sys.executable, "-m", "bench.chain_peer", role, server.url, sock]
                procs.append(Process(role, argv, clean_env({}), tmp_path / f"{role}.log").start())
                stack.callback(procs[-1].stop)
            await wait_until(lambda: _listening(sock, procs[0]), 30.0, "the runner's socket")
            for proc in procs[1:]:
                await wait_consumers(js, EVENTS, [DURABLES[proc.name][0]], proc)
            try:
                took = await _runs(nc, js, procs, runs, warmup)
            except TimeoutError:
                tails = "\n".join(f"{p.name}: {p.tail(5)}" for p in procs)
                raise BenchError(f"the raw chain stalled; its processes' logs:\n{tails}") from None
    return [
        stats.latency(f"raw hops: request -> {state}", samples) for state, samples in took.items()
    ]


if __name__ == "__main__":
    role, url, *rest = sys.argv[1:]
    if role == "runner":
        runner(rest[0])
    else:
        asyncio.run(serve(role, url, rest[0]))
