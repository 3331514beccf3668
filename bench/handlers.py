"""Handlers bench (issue 9): how many events one handler process settles per second.

One `spinyard handlers page_load heartbeat` process against nats-server, a
shared app (examples/hello) already running. For each kind a backlog of N
events is published into JetStream while no handler process runs; then a
fresh handler process is started and drains it. Figures per kind:

- events/s from the first message delivered to the last one settled (read
  from the consumer's info, polled every `poll_s`), and the handler
  process's CPU seconds per event over that span (/proc/<pid>/stat);
- the same-run baseline: a raw nats-py process (`python -m bench.handlers
  raw ...`) pulling the same number of messages of the same size from a
  work-queue stream shaped like spinyard's and acking each (`msg.ack()`),
  nothing else; measured the same way, just before;
- that nothing was lost or doubled: every message delivered once and acked
  (no redeliveries, nothing pending), `ok` counted N times in the handler's
  /metrics, and 0 dead letters.

Page loads are warm loads of the shared app from N different sessions (each
answers the `ready` status and records the load); heartbeats are visible,
focused and recent (each counted); run requests are runs of a job app from N
sessions, each accepted (recorded `queued`, its status published and its
`run_start` emitted; no run_start handler runs, so nothing starts): issue
10's acceptance rate, for one process.
"""

import asyncio
import contextlib
import signal
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import nats
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from bench import stats
from bench.stack import (
    BenchError,
    Process,
    clean_env,
    free_port,
    handlers_process,
    stop_instances,
    wait_consumers,
    wait_until,
)
from bench.stats import cpu_seconds
from bench.viz import SHARED, Watch, bench_specs, page_load
from dispatcher.bus import provision
from dispatcher.embedded.natsserver import NatsServer
from dispatcher.settings import HandlerSettings, NatsSettings
from schemas import subjects
from schemas.codec import encode
from schemas.events import Heartbeat, PageLoad, RunRequest
from schemas.spec import AppSpec

KINDS = ["page_load", "heartbeat", "run_request"]
JOB_APP = "bench/accept"
RAW_STREAM, RAW_SUBJECT, RAW_DURABLE = "BENCH_PULL", "bench.pull.in", "bench-pull"
RAW_BATCH = 64  # the raw loop's pull size (its fastest of 16/64/256 here)
PUBLISH_WINDOW = 2000  # publishes sent before their flush
GOALS = {"page_load": 2000.0, "heartbeat": 3000.0, "run_request": 1000.0}  # /s, issues 9, 10


@dataclass(frozen=True)
class Sizes:
    events: int = 20_000  # per kind, and as many raw pulls
    poll_s: float = 0.005  # consumer info polls while a backlog drains
    timeout_s: float = 120.0  # a drain that takes longer fails the bench
    event_loop: str = "auto"  # the handler process's (setting `event_loop`)
    settings: dict[str, str] = field(default_factory=dict)  # more, as `handlers__fetch_batch`


FULL = Sizes()
QUICK = Sizes(events=300)


async def publish_backlog(nc, subject: str, events: list) -> None:
    """Publish `events` with their de-duplication ids, core NATS, flushed in windows."""
    for i, event in enumerate(events, 1):
        await nc.publish(subject, encode(event), headers={"Nats-Msg-Id": event.id})
        if i % PUBLISH_WINDOW == 0:
            await nc.flush()
    await nc.flush()


async def drain(js, stream: str, durable: str, n: int, pid: int, sizes: Sizes) -> dict:
    """Watch a consumer with `n` messages waiting drain; its rate, and `pid`'s CPU on it."""
    base = await js.consumer_info(stream, durable)
    start_seq = base.delivered.consumer_seq
    # The span starts at the last poll that saw nothing delivered yet (it is at most
    # one poll longer than the drain, never shorter), and ends at the first that saw
    # all of it settled.
    started, cpu0, running = time.perf_counter(), cpu_seconds(pid), False
    deadline = started + sizes.timeout_s
    while True:
        before, cpu_before = time.perf_counter(), cpu_seconds(pid)
        info = await js.consumer_info(stream, durable)
        now = time.perf_counter()
        if not running:
            if info.delivered.consumer_seq == start_seq:
                started, cpu0 = before, cpu_before
            else:
                running = True
        if running and not info.num_pending and not info.num_ack_pending:
            cpu1 = cpu_seconds(pid)
            break
        if now > deadline:
            raise BenchError(f"{durable}: {info.num_pending} pending after {sizes.timeout_s} s")
        await asyncio.sleep(sizes.poll_s)
    seconds = now - started
    return {
        "n": n,
        "seconds": seconds,
        "per_s": n / seconds,
        "cpu_ms_per_event": (cpu1 - cpu0) * 1000 / n,
        "delivered": info.delivered.consumer_seq - start_seq,
        "redelivered": info.num_redelivered,
        "pending": info.num_pending + info.num_ack_pending,
    }


async def raw_pass(js, url: str, data: bytes, n: int, tmp: Path, sizes: Sizes) -> dict:
    """`n` messages of `data` pulled and acked by a raw nats-py process."""
    await publish_backlog_raw(js._nc, data, n)
    await wait_until(
        lambda: pending_is(js, RAW_STREAM, RAW_DURABLE, n), 30.0, "the raw backlog to be stored"
    )
    raw = Process(
        "raw pull + ack",
        [sys.executable, "-m", "bench.handlers", "raw", url],
        clean_env({}),
        tmp / "raw.log",
    ).start()
    try:
        return await drain(js, RAW_STREAM, RAW_DURABLE, n, raw.proc.pid, sizes)
    finally:
        raw.stop()


async def publish_backlog_raw(nc, data: bytes, n: int) -> None:
    for i in range(n):
        await nc.publish(RAW_SUBJECT, data, headers={"Nats-Msg-Id": f"raw-{time.time_ns()}-{i}"})
        if (i + 1) % PUBLISH_WINDOW == 0:
            await nc.flush()
    await nc.flush()


async def pending_is(js, stream: str, durable: str, n: int) -> bool:
    return (await js.consumer_info(stream, durable)).num_pending == n


async def setup_raw(js) -> None:
    """A work-queue stream and durable pull consumer shaped like spinyard's events'."""
    handler = HandlerSettings()
    await js.add_stream(
        StreamConfig(
            name=RAW_STREAM,
            subjects=[RAW_SUBJECT],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=120.0,
        )
    )
    await js.add_consumer(
        RAW_STREAM,
        ConsumerConfig(
            durable_name=RAW_DURABLE,
            filter_subject=RAW_SUBJECT,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=handler.ack_wait_s,
            max_ack_pending=handler.max_ack_pending,
        ),
    )


async def outcomes(port: int) -> dict[str, float]:
    """`spinyard_handler_messages_total` by `handler/outcome`, from the handler's /metrics."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
    found = {}
    for line in text.splitlines():
        if line.startswith("spinyard_handler_messages_total{"):
            labels, value = line[len("spinyard_handler_messages_total{") :].split("} ")
            parts = dict(p.split("=") for p in labels.split(","))
            key = f"{parts['handler'].strip(chr(34))}/{parts['outcome'].strip(chr(34))}"
            found[key] = float(value)
    return found


def backlog(kind: str, n: int, run: int) -> list:
    if kind == "page_load":
        return [PageLoad(app=SHARED, session=f"s-{run}-{i}") for i in range(n)]
    if kind == "run_request":
        return [RunRequest(app=JOB_APP, session=f"s-{run}-{i}", inputs={"n": i}) for i in range(n)]
    return [
        Heartbeat(app=SHARED, session=f"s-{run}-{i}", visible=True, focused=True, idle_s=0.0)
        for i in range(n)
    ]


async def run(sizes: Sizes = FULL) -> dict:
    with tempfile.TemporaryDirectory(prefix="spinyard-bench-handlers-") as tmp:
        async with AsyncExitStack() as stack:
            return await _run(Path(tmp), sizes, stack)


async def _run(tmp: Path, sizes: Sizes, stack: AsyncExitStack) -> dict:
    machine = stats.machine()
    server = NatsServer(tmp / "nats").start()
    stack.callback(server.stop)
    nc = await nats.connect(server.url, name="bench-handlers")
    stack.push_async_callback(nc.close)
    js = nc.jetstream()
    nsettings = NatsSettings(url=server.url)
    await provision.ensure_streams(js, nsettings)
    state = await provision.ensure_state(js, nsettings)
    await state.apps.put(SHARED, bench_specs(1)[SHARED])
    job = AppSpec(name=JOB_APP, kind="job", command=["true"], outputs=["out.json"])
    await state.apps.put(JOB_APP, job)
    await setup_raw(js)
    data_dir = tmp / "data"
    stack.push_async_callback(stop_instances, data_dir)  # after every handler process stops
    port = free_port()

    def start_handlers() -> Process:
        proc = handlers_process(
            KINDS,
            server.url,
            data_dir,
            tmp,
            # info, as in production (its lines go to a file), unless `settings` say
            **({"log_level": "info"} | sizes.settings),
            handlers__health_port=str(port),
            event_loop=sizes.event_loop,
        ).start()
        stack.callback(proc.stop)
        return proc

    warm = start_handlers()
    await wait_consumers(js, subjects.EVENTS_STREAM, KINDS, warm)
    watch = Watch()
    sub = await nc.subscribe(subjects.app_status(SHARED, None), cb=watch.on_msg)
    await page_load(js, watch, SHARED, "s-warm")  # the shared app starts: warm from here on
    await sub.unsubscribe()
    warm.stop()

    rows = []
    for number, kind in enumerate(KINDS):
        events = backlog(kind, sizes.events, number)
        raw = await raw_pass(js, server.url, encode(events[0]), sizes.events, tmp, sizes)
        await publish_backlog(nc, subjects.event(kind, events[0].app), events)
        await wait_until(
            lambda k=kind: pending_is(js, subjects.EVENTS_STREAM, k, sizes.events),
            30.0,
            f"the {kind} backlog to be stored",
        )
        proc = start_handlers()
        measured = await drain(js, subjects.EVENTS_STREAM, kind, sizes.events, proc.proc.pid, sizes)
        counted = await wait_until(
            lambda k=kind: _counted(port, k, sizes.events), 10.0, f"{kind} outcomes in /metrics"
        )
        proc.check()
        proc.stop()
        rows.append(
            {
                "name": kind,
                **measured,
                "outcomes": counted,
                "bytes": len(encode(events[0])),
                "raw_per_s": raw["per_s"],
                "raw_cpu_ms_per_event": raw["cpu_ms_per_event"],
                "ratio": measured["per_s"] / raw["per_s"],
                # CPU per event is steadier than events/s on a shared machine: the
                # rate one core would give, and its ratio to the raw loop's.
                "per_cpu_s": stats.ratio(1000, measured["cpu_ms_per_event"]),
                "cpu_ratio": stats.ratio(raw["cpu_ms_per_event"], measured["cpu_ms_per_event"]),
                "goal_per_s": GOALS[kind],
                "raw": raw,
            }
        )
    dead = (await js.stream_info(subjects.DEAD_STREAM)).state.messages
    return {
        "bench": "handlers",
        "machine": machine,
        "loadavg_1m_end": stats.machine()["loadavg_1m"],
        "sizes": asdict(sizes),
        "rows": rows,
        "dead_letters": dead,
        "errors": _problems(rows, dead, sizes.events),
    }


async def _counted(port: int, kind: str, n: int) -> dict | None:
    with contextlib.suppress(aiohttp.ClientError):
        found = {k: v for k, v in (await outcomes(port)).items() if k.startswith(f"{kind}/")}
        if sum(found.values()) >= n:
            return found
    return None


def _problems(rows: list[dict], dead: int, n: int) -> list[str]:
    """What was lost or doubled (the bench fails on any)."""
    problems = [f"{dead} dead letters"] if dead else []
    for row in rows:
        for label, figures in ((row["name"], row), (f"raw ({row['name']})", row["raw"])):
            if figures["delivered"] != n or figures["redelivered"] or figures["pending"]:
                problems.append(
                    f"{label}: {figures['delivered']} deliveries of {n}, "
                    f"{figures['redelivered']} redelivered, {figures['pending']} unsettled"
                )
        if row["outcomes"] != {f"{row['name']}/ok": float(n)}:
            problems.append(f"{row['name']}: outcomes {row['outcomes']}, want {n} ok")
    return problems


COLUMNS = (
    ("kind", "name"),
    ("n", "n"),
    ("bytes", "bytes"),
    ("events/s", "per_s"),
    ("raw pull+ack /s", "raw_per_s"),
    ("ratio", "ratio"),
    ("goal /s", "goal_per_s"),
    ("CPU ms/event", "cpu_ms_per_event"),
    ("raw CPU ms/event", "raw_cpu_ms_per_event"),
    ("events/CPU-s", "per_cpu_s"),
    ("CPU ratio", "cpu_ratio"),
)


def format_result(result: dict) -> str:
    lines = [
        "handlers: one `spinyard handlers` process draining a backlog, against raw pull + ack",
        stats.table(result["rows"], COLUMNS),
        "events/s from the first delivery to the last settlement; CPU of that process only;",
        "events/CPU-s = 1000 / CPU ms per event; CPU ratio = raw CPU ms / handler CPU ms.",
        f"dead letters: {result['dead_letters']}; problems: {result['errors'] or 'none'}",
        stats.load_line(result),
    ]
    return "\n".join(lines)


def main(quick: bool = False) -> dict:
    result = asyncio.run(run(QUICK if quick else FULL))
    print(format_result(result), flush=True)
    return result


async def raw_consumer(url: str) -> None:
    """The baseline's process: pull `RAW_BATCH` at a time and ack each, until SIGTERM."""
    nc = await nats.connect(url, name="bench-raw-pull")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    pull = await nc.jetstream().pull_subscribe_bind(durable=RAW_DURABLE, stream=RAW_STREAM)
    try:
        while not stopping.is_set():
            try:
                msgs = await pull.fetch(RAW_BATCH, timeout=0.2)
            except TimeoutError:
                continue
            for msg in msgs:
                await msg.ack()
    finally:
        with contextlib.suppress(Exception):
            await pull.unsubscribe()
        await nc.drain()


if __name__ == "__main__":
    if sys.argv[1:2] == ["raw"]:
        asyncio.run(raw_consumer(sys.argv[2]))
