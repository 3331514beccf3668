"""Viz bench (issue 2): page load to `ready` for a warm app, against raw NATS round trips.

Processes: this one (the "page": a nats-py client that publishes page loads
with JetStream and reads status on a core NATS subscription); nats-server;
`spinyard handlers page_load heartbeat reaper_tick pool_refill`; the raw
NATS peer (`bench.nats_peer`); and the examples/hello instances the local
backend starts. Figures, all measured in this one run:

- raw request/reply: `nc.request` answered by the peer process (the baseline);
- raw JetStream floor: acked publish -> durable pull consumer in the peer ->
  acked JetStream publish of the reply -> core subscriber here;
- page load -> ready (warm): the shared app already runs;
- cold starts: the shared app's first load, and per-session loads without a pool;
- warm pool claim -> ready: per-session loads served from a full warm pool.

The three round trips run interleaved in blocks, so drift hits them alike.
"""

import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import msgpack
import nats

from bench import nats_peer, stats
from bench.stack import (
    ROOT,
    BenchError,
    Process,
    app_alone,
    clean_env,
    handlers_process,
    stop_instances,
    wait_consumers,
    wait_until,
)
from dispatcher.bus import provision
from dispatcher.embedded.natsserver import NatsServer
from dispatcher.settings import NatsSettings
from schemas import subjects
from schemas.codec import encode
from schemas.events import PageLoad, new_id
from schemas.spec import AppSpec, load_spec

HELLO_SPEC = ROOT / "examples" / "hello" / "spinyard.yaml"
SHARED, COLD, POOLED = "bench/hello", "bench/cold", "bench/pooled"
KINDS = ["page_load", "heartbeat", "reaper_tick", "pool_refill"]
TIMEOUT_S = 30.0  # any one answer; far above any expected figure


@dataclass(frozen=True)
class Sizes:
    loads: int = 1000  # warm page loads, and as many of each raw round trip
    warmup: int = 20  # of each round trip, not recorded
    block: int = 100  # interleaving block
    cold: int = 5  # cold starts of a per-session app without a pool
    pool_loads: int = 50
    pool_size: int = 3


FULL = Sizes()
QUICK = Sizes(loads=200, warmup=10, block=50, cold=3, pool_loads=10, pool_size=2)


def bench_specs(pool_size: int) -> dict[str, AppSpec]:
    """examples/hello as the shared app, a per-session one, and a per-session one with a pool."""
    base = load_spec(HELLO_SPEC).model_dump()
    short_idle = base["idle"] | {"since_heartbeat_s": 5.0}  # the reaper stops used instances
    session = {"sharing": "per_session", "idle": short_idle}
    return {
        SHARED: AppSpec.model_validate(base | {"name": SHARED}),
        COLD: AppSpec.model_validate(base | session | {"name": COLD}),
        POOLED: AppSpec.model_validate(
            base | session | {"name": POOLED, "pool": {"size": pool_size}}
        ),
    }


class Watch:
    """A core NATS subscription whose messages are queued with their arrival time."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[float, str, bytes]] = asyncio.Queue()

    async def on_msg(self, msg) -> None:
        self.queue.put_nowait((time.perf_counter(), msg.subject, msg.data))

    def clear(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()

    async def until(self, want: Callable[[str, dict], bool]) -> tuple[float, dict]:
        """Arrival time and status of the first message `want`s; raise on `failed`."""
        async with asyncio.timeout(TIMEOUT_S):
            while True:
                at, subject, data = await self.queue.get()
                status = msgpack.unpackb(data)
                if status.get("state") == "failed":
                    raise BenchError(f"{subject} failed: {status.get('error')}")
                if want(subject, status):
                    return at, status


def is_ready(subject: str) -> Callable[[str, dict], bool]:
    return lambda s, status: s == subject and status.get("state") == "ready"


async def page_load(
    js, watch: Watch, app: str, session: str, shared: bool | None = None
) -> tuple[float, dict]:
    """Publish a page load; seconds until its `ready` arrives, and that status.

    `shared`: whether `app` is a shared app (default: only SHARED is)."""
    event = PageLoad(app=app, session=session)
    data, headers = encode(event), {"Nats-Msg-Id": event.id}
    per_session = app != SHARED if shared is None else not shared
    subject = subjects.app_status(app, session if per_session else None)
    watch.clear()
    t0 = time.perf_counter()
    await js.publish(subjects.event(subjects.PAGE_LOAD, app), data, headers=headers)
    at, status = await watch.until(is_ready(subject))
    return at - t0, status


async def interleaved(
    measures: dict[str, Callable[[], Awaitable[float]]], n: int, block: int
) -> dict[str, list[float]]:
    """`n` samples of each measure, in blocks whose order rotates each round."""
    samples: dict[str, list[float]] = {name: [] for name in measures}
    order = list(measures)
    while len(samples[order[0]]) < n:
        size = min(block, n - len(samples[order[0]]))
        for name in order:
            for _ in range(size):
                samples[name].append(await measures[name]())
        order = order[1:] + order[:1]
    return samples


async def pool_warm(state, size: int) -> bool:
    index = await state.pools.get(POOLED)
    return index is not None and len(index.warm) >= size


async def run(sizes: Sizes = FULL) -> dict:
    """Run the viz bench; the result dict holds every row (ms) and what ran where."""
    with tempfile.TemporaryDirectory(prefix="spinyard-bench-viz-") as tmp:
        async with AsyncExitStack() as stack:
            return await _run(Path(tmp), sizes, stack)


@dataclass
class Page:
    """The running parts a viz bench talks to: the page's connection, KV, the handlers."""

    server: NatsServer
    nc: nats.NATS
    js: object
    state: object
    handlers: Process
    status: Watch


async def start_page(
    tmp: Path, stack: AsyncExitStack, apps: dict[str, AppSpec], pool_size: int
) -> Page:
    """nats-server, the streams and buckets, `apps` registered, `spinyard handlers KINDS`
    pulling, and a `Watch` on every status; all stopped by `stack`."""
    server = NatsServer(tmp / "nats").start()
    stack.callback(server.stop)
    nc = await nats.connect(server.url, name="bench-page")
    stack.push_async_callback(nc.close)
    js = nc.jetstream()
    nsettings = NatsSettings(url=server.url)
    await provision.ensure_streams(js, nsettings)
    state = await provision.ensure_state(js, nsettings)
    for name, spec in apps.items():
        await state.apps.put(name, spec)
    data_dir = tmp / "data"
    handlers = handlers_process(
        KINDS,
        server.url,
        data_dir,
        tmp,
        reaper__interval_s="1.0",
        reaper__pool_refill_per_tick=str(pool_size),
    ).start()
    stack.push_async_callback(stop_instances, data_dir)  # runs after the handlers stop
    stack.callback(handlers.stop)
    await wait_consumers(js, subjects.EVENTS_STREAM, KINDS, handlers)
    status = Watch()
    await nc.subscribe(f"{subjects.STATUS}.>", cb=status.on_msg)
    return Page(server, nc, js, state, handlers, status)


async def _run(tmp: Path, sizes: Sizes, stack: AsyncExitStack) -> dict:
    machine = stats.machine()
    specs = bench_specs(sizes.pool_size)
    page = await start_page(tmp, stack, {n: specs[n] for n in (SHARED, COLD)}, sizes.pool_size)
    server, nc, js, state, handlers, status = (
        page.server,
        page.nc,
        page.js,
        page.state,
        page.handlers,
        page.status,
    )
    await nats_peer.setup(js)
    peer = Process(
        "raw NATS peer",
        [sys.executable, "-m", "bench.nats_peer", server.url],
        clean_env({}),
        tmp / "peer.log",
    ).start()
    stack.callback(peer.stop)
    await wait_consumers(js, nats_peer.JS_STREAM, [nats_peer.JS_DURABLE], peer)

    reply = Watch()
    await nc.subscribe(nats_peer.JS_REPLY, cb=reply.on_msg)
    payload = encode(PageLoad(app=SHARED, session="s-bench"))

    first, _ = await page_load(js, status, SHARED, "s-first")

    async def raw_rr() -> float:
        t0 = time.perf_counter()
        await nc.request(nats_peer.RR_SUBJECT, payload, timeout=TIMEOUT_S)
        return time.perf_counter() - t0

    async def js_floor() -> float:
        reply.clear()
        t0 = time.perf_counter()
        await js.publish(nats_peer.JS_SUBJECT, payload, headers={"Nats-Msg-Id": new_id()})
        at, _ = await reply.until(lambda s, m: True)
        return at - t0

    async def warm_load() -> float:
        return (await page_load(js, status, SHARED, "s-bench"))[0]

    measures = {"raw_rr": raw_rr, "js_floor": js_floor, "page_load": warm_load}
    await interleaved(measures, sizes.warmup, sizes.warmup)
    samples = await interleaved(measures, sizes.loads, sizes.block)

    cold = [(await page_load(js, status, COLD, f"s-cold-{i}"))[0] for i in range(sizes.cold)]
    alone = await app_alone(specs[COLD], sizes.cold)

    await state.apps.put(POOLED, specs[POOLED])
    pool, misses = [], 0
    for i in range(sizes.pool_loads):
        await wait_until(lambda: pool_warm(state, sizes.pool_size), 60.0, "the warm pool to refill")
        took, ready = await page_load(js, status, POOLED, f"s-pool-{i}")
        pool.append(took)
        misses += not ready["phases"].get("warm")
    handlers.check()

    baseline = stats.latency("raw request/reply (peer process)", samples["raw_rr"])
    rows = stats.add_ratios(
        [
            baseline,
            stats.latency("raw JetStream publish -> pull -> publish", samples["js_floor"]),
            stats.latency("page load -> ready (warm, shared app)", samples["page_load"]),
            stats.latency("cold start -> ready (first load, shared)", [first]),
            stats.latency("cold start -> ready (per_session, no pool)", cold),
            stats.latency("  the app alone: spawn -> /healthz (5 ms polls)", alone),
            stats.latency("warm pool claim -> ready (per_session)", pool, misses=misses),
        ],
        baseline,
    )
    return {
        "bench": "viz",
        "machine": machine,
        "loadavg_1m_end": stats.machine()["loadavg_1m"],
        "sizes": asdict(sizes),
        "baseline": baseline["name"],
        "rows": rows,
        "pool_vs_cold_p50": stats.ratio(rows[6]["p50_ms"], rows[4]["p50_ms"]),
        "pool_misses": misses,
        "processes": {
            "bench (page)": "publishes events, subscribes to status; nats-py, this process",
            "nats-server": "subprocess, JetStream file store in a temp dir",
            "handlers": "subprocess: python -m dispatcher.cli handlers " + " ".join(KINDS),
            "raw peer": "subprocess: python -m bench.nats_peer (request/reply + JetStream echo)",
            "app instances": "examples/hello processes started by the handlers' local backend",
        },
    }


def format_result(result: dict) -> str:
    lines = [
        "viz: page load -> ready, against raw NATS round trips (same run)",
        stats.table(result["rows"], stats.LATENCY_COLUMNS),
        f"ratios are to {result['baseline']}.",
        f"warm pool claim p50 / cold start p50 = {result['pool_vs_cold_p50']:.3f}; "
        f"pool misses (not served warm): {result['pool_misses']}",
        "note: page_load records each load (one KV put) after it answers; measured as is.",
        stats.load_line(result),
    ]
    return "\n".join(lines)


def main(quick: bool = False) -> dict:
    result = asyncio.run(run(QUICK if quick else FULL))
    print(format_result(result), flush=True)
    return result
