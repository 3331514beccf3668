"""Gateway bench (issue 9): the browser's path through HTTP and SSE, against raw aiohttp.

Processes: this one (the "browsers": aiohttp clients); nats-server;
`spinyard handlers page_load heartbeat reaper_tick pool_refill` (its /metrics
on a health port); `spinyard gateway` with HS256 tokens on; the raw aiohttp
peer (`bench.gateway_peer`); and the shared app `bench/hello` (examples/hello,
warmed first). Figures, all from this one run, latencies interleaved in blocks:

- raw aiohttp POST -> 202 (the baseline of POST -> 202 and of the load phase);
- raw aiohttp POST -> SSE line on an open stream (the baseline of page load -> ready);
- raw aiohttp: open an SSE stream -> first line;
- spinyard POST /v1/events (a heartbeat) -> 202;
- spinyard warm page load -> `ready` on an open SSE status stream;
- spinyard: open an SSE status stream -> first status;
- load: 1/8/32/128 viewers posting page loads and heartbeats (3 in 4) back to back
  for a few seconds: accepted/s, handled/s (the handlers' /metrics), the backlog
  (consumers' pending + unacked) when the load stops and the time it takes to drain,
  every accepted event settled once, dead letters; raw aiohttp accepting/s alike.
- `spinyard up` (one process tree) under `up_viewers` viewers, if `up` is set.
"""

import asyncio
import contextlib
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import nats

from bench import gateway_peer, stats
from bench.stack import (
    ROOT,
    BenchError,
    Process,
    clean_env,
    free_port,
    handlers_process,
    spinyard_env,
    stop_instances,
    wait_consumers,
    wait_until,
)
from bench.viewers import SseStream, answers, outcomes, post, viewers
from bench.viz import interleaved
from dispatcher.bus import provision
from dispatcher.embedded.natsserver import NatsServer
from dispatcher.gateway.auth import mint
from dispatcher.settings import NatsSettings
from schemas import subjects
from schemas.events import new_id
from schemas.spec import AppSpec, load_spec

HELLO_SPEC = ROOT / "examples" / "hello" / "spinyard.yaml"
SHARED = "bench/hello"
UP_APP = "demo/hello"  # examples/hello, as `spinyard up --apps examples/hello` registers it
KINDS = ["page_load", "heartbeat", "reaper_tick", "pool_refill"]
LOADED = ("page_load", "heartbeat")  # the handlers the viewers keep busy
SECRET = "bench-secret-" + "x" * 32


@dataclass(frozen=True)
class Sizes:
    samples: int = 1000  # of each latency measure
    warmup: int = 50
    block: int = 100
    opens: int = 200  # SSE streams opened (and closed), each side
    viewers: tuple[int, ...] = (1, 8, 32, 128)
    load_s: float = 5.0
    drain_timeout_s: float = 60.0
    up: bool = True  # also the `spinyard up` load phase
    up_viewers: int = 32


FULL = Sizes()
QUICK = Sizes(
    samples=60,
    warmup=5,
    block=30,
    opens=10,
    viewers=(1, 8),
    load_s=1.0,
    drain_timeout_s=20.0,
    up=False,
)


def event(kind: str, session: str, app: str = SHARED) -> dict:
    """A page load or heartbeat as a browser posts it."""
    body = {"type": kind, "id": new_id(), "app": app, "session": session}
    if kind == "heartbeat":
        body |= {"visible": True, "focused": True, "idle_s": 1.0}
    return body


def viewer_events(app: str, url: str) -> callable:
    """Viewer v's i-th POST: a page load, then three heartbeats, and again; own token."""
    tokens: dict[int, dict] = {}

    def make(v: int, i: int) -> tuple[dict, dict]:
        session = f"s-viewer-{v}"
        if v not in tokens:
            token = mint(SECRET, [app], session=session, ttl_s=3600)
            tokens[v] = {"Authorization": f"Bearer {token}", "Origin": url}
        return event("page_load" if i % 4 == 0 else "heartbeat", session, app), tokens[v]

    return make


async def backlog(js) -> int:
    """Messages the loaded handlers' consumers have not settled: pending + unacked."""
    total = 0
    for durable in LOADED:
        info = await js.consumer_info(subjects.EVENTS_STREAM, durable)
        total += info.num_pending + info.num_ack_pending
    return total


async def dead_letters(js) -> int:
    return (await js.stream_info(subjects.DEAD_STREAM)).state.messages


async def load_level(http, js, gw, metrics_url, peer, count: int, sizes: Sizes, pids=None):
    """One load level: raw aiohttp accepting, then spinyard's figures at `count` viewers.

    With `js` the backlog is the consumers' pending + unacked messages; without (the
    `spinyard up` variant, whose NATS needs a password) it is accepted - settled.
    `<name>_cpu_ms_per_event`: CPU of `pids[name]` from the load's start to the drain."""
    raw, _ = await viewers(
        http, f"{peer}/events", lambda v, i: (event("heartbeat", f"s-{v}"), {}), count,
        sizes.load_s,
    )  # fmt: skip
    before = (await outcomes(http, metrics_url, LOADED))["settled"]
    cpu = {name: stats.cpu_seconds(pid) for name, pid in (pids or {}).items()}
    app = SHARED if js is not None else UP_APP
    accepted, refused = await viewers(
        http, f"{gw}/v1/events", viewer_events(app, gw), count, sizes.load_s
    )
    at_stop = (await outcomes(http, metrics_url, LOADED))["settled"]

    async def left() -> int:
        if js is not None:
            return await backlog(js)
        return accepted - ((await outcomes(http, metrics_url, LOADED))["settled"] - before)

    pending = await left()
    t0 = time.perf_counter()
    drained = None
    with contextlib.suppress(BenchError):  # not drained in time: reported as None
        await wait_until(lambda: zero(left), sizes.drain_timeout_s, "the backlog to drain", 0.05)
        drained = time.perf_counter() - t0
    spent = {name: stats.cpu_seconds(pid) - cpu[name] for name, pid in (pids or {}).items()}
    after = await outcomes(http, metrics_url, LOADED)
    return {
        **{f"{name}_cpu_ms_per_event": 1000 * s / max(accepted, 1) for name, s in spent.items()},
        "viewers": count,
        "raw_accepted_per_s": raw / sizes.load_s,
        "accepted_per_s": accepted / sizes.load_s,
        "ratio_accepted": stats.ratio(accepted, raw),
        "refused": refused,
        "handled_per_s": (at_stop - before) / sizes.load_s,
        "backlog_at_stop": pending,
        "drain_s": drained,
        "accepted": accepted,
        "settled": after["settled"] - before,
        "dead_lettered_total": after.get("dead_lettered", 0),
    }


async def zero(count) -> bool:
    return await count() == 0


async def run(sizes: Sizes = FULL) -> dict:
    with tempfile.TemporaryDirectory(prefix="spinyard-bench-gateway-") as tmp:
        async with AsyncExitStack() as stack:
            result = await _run(Path(tmp), sizes, stack)
        if sizes.up:
            from bench.gateway_up import up_load  # it reuses this module's pieces

            result["up"] = await up_load(Path(tmp), sizes)
        return result


async def start(tmp: Path, stack: AsyncExitStack) -> dict:
    """nats-server, the handlers (metrics on a port), the gateway, the raw peer; the app
    registered. Everything is stopped by `stack`."""
    server = NatsServer(tmp / "nats").start()
    stack.callback(server.stop)
    nc = await nats.connect(server.url, name="bench-gateway")
    stack.push_async_callback(nc.close)
    js = nc.jetstream()
    nsettings = NatsSettings(url=server.url)
    await provision.ensure_streams(js, nsettings)
    state = await provision.ensure_state(js, nsettings)
    spec = load_spec(HELLO_SPEC).model_dump() | {"name": SHARED}
    await state.apps.put(SHARED, AppSpec.model_validate(spec))
    data_dir = tmp / "data"
    health = free_port()
    handlers = handlers_process(
        KINDS, server.url, data_dir, tmp, handlers__health_port=str(health)
    ).start()
    stack.push_async_callback(stop_instances, data_dir)  # runs after the handlers stop
    stack.callback(handlers.stop)
    await wait_consumers(js, subjects.EVENTS_STREAM, KINDS, handlers)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = spinyard_env(
        server.url,
        data_dir,
        gateway__port=str(port),
        gateway__public_url=url,
        auth__hs256_secret=SECRET,
    )
    argv = [sys.executable, "-m", "dispatcher.cli", "gateway"]
    gateway = Process("spinyard gateway", argv, env, tmp / "gateway.log").start()
    stack.callback(gateway.stop)
    peer_port = free_port()
    await gateway_peer.setup(js)
    peer = Process(
        "raw aiohttp peer",
        [sys.executable, "-m", "bench.gateway_peer", str(peer_port), server.url],
        clean_env({}),
        tmp / "peer.log",
    ).start()
    stack.callback(peer.stop)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    stack.push_async_callback(http.close)
    peer_url = f"http://127.0.0.1:{peer_port}"
    for proc, health_url in ((gateway, f"{url}/healthz"), (peer, f"{peer_url}/status")):
        await wait_until(lambda p=proc, u=health_url: answers(http, p, u), 30.0, proc.name)
    return {
        "js": js, "http": http, "gw": url, "peer": peer_url, "handlers": handlers,
        "gateway": gateway, "metrics": f"http://127.0.0.1:{health}/metrics",
    }  # fmt: skip


async def _run(tmp: Path, sizes: Sizes, stack: AsyncExitStack) -> dict:
    machine = stats.machine()
    parts = await start(tmp, stack)
    js, http, gw, peer = parts["js"], parts["http"], parts["gw"], parts["peer"]
    token = mint(SECRET, [SHARED], session="s-bench", ttl_s=3600)
    auth = {"Authorization": f"Bearer {token}", "Origin": gw}
    status_url = f"{gw}/v1/apps/{SHARED}/status"

    gw_sse, raw_sse = SseStream(), SseStream()
    stack.push_async_callback(gw_sse.close)
    stack.push_async_callback(raw_sse.close)
    # The first page load starts the shared app (a stream opens on its first status):
    # wait for it to be ready (warm) before anything is timed.
    await post(http, f"{gw}/v1/events", event("page_load", "s-bench"), auth)
    await gw_sse.open(http, status_url, auth)
    await gw_sse.next(lambda s: s.get("state") == "ready")
    await raw_sse.open(http, f"{peer}/status", {})

    async def raw_post() -> float:
        return await post(http, f"{peer}/events", event("heartbeat", "s-bench"), {})

    async def raw_stored() -> float:
        return await post(http, f"{peer}/stored", event("heartbeat", "s-bench"), {})

    async def raw_line() -> float:
        raw_sse.clear()
        t0 = time.perf_counter()
        await post(http, f"{peer}/publish", {"state": "ready", "id": new_id()}, {})
        at, _ = await raw_sse.next()
        return at - t0

    async def gw_post() -> float:
        return await post(http, f"{gw}/v1/events", event("heartbeat", "s-bench"), auth)

    async def gw_ready() -> float:
        gw_sse.clear()
        t0 = time.perf_counter()
        await post(http, f"{gw}/v1/events", event("page_load", "s-bench"), auth)
        at, _ = await gw_sse.next(lambda s: s.get("state") == "ready")
        return at - t0

    async def opened(url: str, headers: dict) -> float:
        stream = SseStream()
        try:
            return await stream.open(http, url, headers)
        finally:
            await stream.close()

    measures = {
        "raw_post": raw_post,
        "raw_stored": raw_stored,
        "raw_line": raw_line,
        "post": gw_post,
        "ready": gw_ready,
    }
    await interleaved(measures, sizes.warmup, sizes.warmup)
    samples = await interleaved(measures, sizes.samples, sizes.block)
    opens = await interleaved(
        {"raw": lambda: opened(f"{peer}/status", {}), "gw": lambda: opened(status_url, auth)},
        sizes.opens,
        sizes.block,
    )
    await wait_until(lambda: zero(lambda: backlog(js)), sizes.drain_timeout_s, "the drain")

    raw_post_row = stats.latency("raw aiohttp POST -> 202", samples["raw_post"])
    raw_line_row = stats.latency("raw aiohttp POST -> SSE line", samples["raw_line"])
    raw_open_row = stats.latency("raw aiohttp open SSE -> first line", opens["raw"])
    rows = [
        raw_post_row,
        *stats.add_ratios(
            [
                stats.latency("raw aiohttp + JetStream publish -> 202", samples["raw_stored"]),
                stats.latency("spinyard POST /v1/events -> 202", samples["post"]),
            ],
            raw_post_row,
        ),
        raw_line_row,
        *stats.add_ratios(
            [stats.latency("spinyard page load -> ready on open SSE", samples["ready"])],
            raw_line_row,
        ),
        raw_open_row,
        *stats.add_ratios(
            [stats.latency("spinyard open SSE -> first status", opens["gw"])], raw_open_row
        ),
    ]
    for row in (raw_post_row, raw_line_row, raw_open_row):
        row["ratio_p50"] = row["ratio_p99"] = 1.0
    for row in rows:
        row["p99_over_p50"] = stats.ratio(row["p99_ms"], row["p50_ms"])

    levels = []
    for count in sizes.viewers:
        levels.append(await load_level(http, js, gw, parts["metrics"], peer, count, sizes))
        parts["handlers"].check()
        parts["gateway"].check()
    return {
        "bench": "gateway",
        "machine": machine,
        "loadavg_1m_end": stats.machine()["loadavg_1m"],
        "sizes": asdict(sizes),
        "rows": rows,
        "load": levels,
        "dead_letters": await dead_letters(js),
        "processes": {
            "bench (browsers)": "aiohttp clients, this process",
            "nats-server": "subprocess, JetStream file store in a temp dir",
            "handlers": "subprocess: python -m dispatcher.cli handlers " + " ".join(KINDS),
            "gateway": "subprocess: python -m dispatcher.cli gateway (HS256 tokens)",
            "raw peer": "subprocess: python -m bench.gateway_peer (aiohttp only)",
        },
    }


LOAD_COLUMNS = (
    ("viewers", "viewers"),
    ("raw accepted/s", "raw_accepted_per_s"),
    ("accepted/s", "accepted_per_s"),
    ("ratio", "ratio_accepted"),
    ("handled/s", "handled_per_s"),
    ("backlog at stop", "backlog_at_stop"),
    ("drain s", "drain_s"),
    ("accepted", "accepted"),
    ("settled", "settled"),
    ("refused", "refused"),
)


def format_result(result: dict) -> str:
    columns = (*stats.LATENCY_COLUMNS, ("p99/p50", "p99_over_p50"))
    lines = [
        "gateway: a browser's HTTP and SSE path, against raw aiohttp (same run)",
        stats.table(result["rows"], columns),
        "each spinyard row's ratios are to the raw row above it.",
        "",
        "load: viewers posting page loads and heartbeats back to back "
        f"({result['sizes']['load_s']:g} s per level; raw: the aiohttp peer, same clients)",
        stats.table(result["load"], LOAD_COLUMNS),
        f"dead letters: {result['dead_letters']}",
    ]
    if "up" in result:
        lines += ["", "spinyard up (one process tree):", stats.table([result["up"]], LOAD_COLUMNS)]
    lines.append(stats.load_line(result))
    return "\n".join(lines)


def main(quick: bool = False) -> dict:
    result = asyncio.run(run(QUICK if quick else FULL))
    print(format_result(result), flush=True)
    failures = [
        f"{level['viewers']} viewers: {level['settled']} settled of {level['accepted']} accepted"
        for level in [*result["load"], *([result["up"]] if "up" in result else [])]
        if level["settled"] != level["accepted"]
    ]
    if result["dead_letters"]:
        failures.append(f"{result['dead_letters']} dead letters")
    if failures:
        result["errors"] = failures
    return result
