"""SSE fan-out bench (issue 9): many open status streams on one gateway, and one change to all.

Processes: this one (publishes the status changes, reads the figures);
nats-server; `spinyard gateway` (auth on, one HS256 token for every
stream, as a lecture hall's page would carry); the raw baseline,
`bench.sse_peer raw` (a tiny aiohttp app fed by one core NATS
subscription); and `workers` client processes (`bench.sse_peer clients`),
each opening its share of the streams one after another, so `workers` opens
are in flight at a time. Every stream watches the one shared app's status.

Per server, in the same run (the raw one first, then the gateway):

- open all: seconds from the first connect to the last stream's first status;
- per open: connect -> the stream's first status (its snapshot), p50/p99,
  while `workers` opens are in flight; and `single` more opened one at a time
  once all N are open (the cost of one open; the goal's figure);
- RSS per stream: growth of the server's VmRSS (/proc/<pid>/status) from
  before the first open to after the last, over the number of streams;
- change -> all: a status published (JetStream for the gateway, core NATS
  for the raw app) until the last of the N streams has it, p50/p99 over
  `changes` changes.

The file descriptor limit is raised to its hard limit first (the gateway and
the raw server inherit it).
"""

import asyncio
import json
import resource
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import msgpack
import nats
from nats.aio.client import Client

from bench import stats
from bench.stack import BenchError, Process, clean_env, free_port, spinyard_env, wait_until
from dispatcher.bus import provision
from dispatcher.embedded.natsserver import NatsServer
from dispatcher.gateway.auth import mint
from dispatcher.settings import NatsSettings
from handlers.state import State
from schemas import subjects
from schemas.spec import AppSpec

HALL = "bench/hall"
RAW_SUBJECT = "bench.sse.raw"
SECRET = "bench-fanout-secret-0123456789abcdef0123456789"
TIMEOUT_S = 120.0  # opening a share of the streams, or one change reaching them all
LINGER_S = 1.0  # the gateway's sse_linger_s here: the bench waits for the consumer to go
GOALS = {"rss_per_stream_kb": 10.0, "change_to_all_p50_ms": 1000.0, "open_p50_ms": 2.0}


@dataclass(frozen=True)
class Sizes:
    streams: int = 1000
    changes: int = 10  # status changes timed to reach every stream
    workers: int = 4  # client processes; as many opens in flight
    single: int = 200  # then opened one at a time, with all the others open (and closed again)


FULL = Sizes()
QUICK = Sizes(streams=100, changes=3, workers=2, single=20)


def sizes_for(streams: int | None, quick: bool) -> Sizes:
    base = QUICK if quick else FULL
    if streams is None:
        return base
    workers = min(8, max(2, streams // 1000))
    return Sizes(streams=streams, changes=base.changes, workers=workers, single=base.single)


def raise_fd_limit(streams: int) -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = streams + 512
    if hard != resource.RLIM_INFINITY and hard < need:
        raise BenchError(f"{streams} streams need {need} open files; the hard limit is {hard}")
    return hard


def vmrss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


class Worker:
    """A `bench.sse_peer clients` process and the JSON lines it prints."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: asyncio.Queue[dict] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read(), name="bench-fanout-worker-read")

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.put_nowait(json.loads(raw))
        self.lines.put_nowait({"exited": self.proc.returncode})

    async def expect(self, key: str) -> dict:
        async with asyncio.timeout(TIMEOUT_S):
            while True:
                line = await self.lines.get()
                if key in line:
                    return line
                if "error" in line:
                    raise BenchError(f"a client process failed: {line['error']}")
                if "exited" in line:
                    raise BenchError(f"a client process ended while waiting for {key!r}")

    async def close(self) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            return await self.expect("lost")
        finally:
            await self.proc.wait()
            await self.reader


async def start_workers(
    url: str, path: str, shares: list[int], token: str | None, stack: AsyncExitStack
) -> list[Worker]:
    """One client process per share (how many streams it opens), each ready for `go`."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    workers = []
    for n in shares:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.sse_peer",
            "clients",
            host,
            port,
            path,
            str(n),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=clean_env({"BENCH_TOKEN": token} if token else {}),
        )
        stack.callback(lambda p=proc: p.returncode is None and p.kill())
        workers.append(Worker(proc))
    for worker in workers:
        await worker.expect("ready")
    return workers


async def measure(
    name: str, url: str, path: str, pid: int, publish, sizes: Sizes, token: str | None, probe=None
) -> dict:
    """Open `sizes.streams` streams on `url + path`, then time `sizes.changes` changes;
    `probe()` (awaited once all are open) adds what it returns to the figures."""
    print(f"{name}: opening {sizes.streams} streams", flush=True)
    async with AsyncExitStack() as stack:
        shares = [sizes.streams // sizes.workers] * sizes.workers
        shares[0] += sizes.streams - sum(shares)
        workers = await start_workers(url, path, shares, token, stack)
        rss_before = vmrss_kb(pid)
        opened = await go(workers)
        open_all = max(o["t1"] for o in opened) - min(o["t0"] for o in opened)
        await asyncio.sleep(0.5)  # let the server settle before reading its memory
        rss_after = vmrss_kb(pid)
        probed = await probe() if probe else {}
        print(f"{name}: {sizes.streams} open in {open_all:.2f} s", flush=True)
        single = (await start_workers(url, path, [sizes.single], token, stack))[0]
        one_by_one = (await go([single]))[0]["open_s"]
        await single.close()
        print(f"{name}: timing changes", flush=True)
        fanout = []
        for k in range(1, sizes.changes + 1):
            t0 = time.monotonic()
            await publish(k)
            reached = [(await worker.expect("k"))["t"] for worker in workers]
            fanout.append(max(reached) - t0)
            await asyncio.sleep(0.1)
        lost = sum([(await worker.close())["lost"] for worker in workers])
    return {
        "name": name,
        "open_all_s": open_all,
        "open": stats.latency(
            f"{name}: open -> first status", [t for o in opened for t in o["open_s"]]
        ),
        "open_single": stats.latency(
            f"{name}: open -> first status, one at a time, {sizes.streams} open", one_by_one
        ),
        "rss_kb_before": rss_before,
        "rss_kb_after": rss_after,
        "rss_per_stream_kb": (rss_after - rss_before) / sizes.streams,
        "change_to_all": stats.latency(f"{name}: one change -> all streams", fanout),
        "closed_streams": lost,
        **probed,
    }


async def go(workers: list[Worker]) -> list[dict]:
    """Let `workers` open their streams; what each reports once they are open."""
    for worker in workers:
        assert worker.proc.stdin is not None
        worker.proc.stdin.write(b"go\n")
    return [await worker.expect("opened") for worker in workers]


def payload(k: int) -> bytes:
    return msgpack.packb({"app": HALL, "state": "ready", "url": "http://x/", "k": k})


async def run(sizes: Sizes = FULL) -> dict:
    """Run the fan-out bench; the result dict holds every figure (ms, KB, s)."""
    fd_limit = raise_fd_limit(sizes.streams)
    machine = stats.machine()
    with tempfile.TemporaryDirectory(prefix="spinyard-bench-fanout-") as tmp:
        async with AsyncExitStack() as stack:
            return await _run(Path(tmp), sizes, stack) | {"machine": machine, "fd_limit": fd_limit}


async def hall(tmp: Path, stack: AsyncExitStack, name: str) -> tuple[NatsServer, Client, State]:
    """nats-server with spinyard's streams, buckets and the hall's app; a connection to it."""
    server = NatsServer(tmp / "nats").start()
    stack.callback(server.stop)
    nc = await nats.connect(server.url, name=name)
    stack.push_async_callback(nc.close)
    js = nc.jetstream()
    nsettings = NatsSettings(url=server.url)
    await provision.ensure_streams(js, nsettings)
    state = await provision.ensure_state(js, nsettings)
    await state.apps.put(HALL, AppSpec(name=HALL, kind="viz", command=["x"]))
    return server, nc, state


async def _run(tmp: Path, sizes: Sizes, stack: AsyncExitStack) -> dict:
    server, nc, _ = await hall(tmp, stack, "bench-fanout")
    js = nc.jetstream()
    subject = subjects.app_status(HALL)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = spinyard_env(
        server.url,
        tmp / "data",
        gateway__port=str(port),
        gateway__public_url=url,
        auth__hs256_secret=SECRET,
        gateway__sse_linger_s=str(LINGER_S),
    )
    argv = [sys.executable, "-m", "dispatcher.cli", "gateway"]
    gateway = Process("spinyard gateway", argv, env, tmp / "gateway.log").start()
    stack.callback(gateway.stop)
    raw_port = free_port()
    raw = Process(
        "raw aiohttp SSE",
        [sys.executable, "-m", "bench.sse_peer", "raw", str(raw_port), server.url, RAW_SUBJECT],
        clean_env({}),
        tmp / "raw.log",
    ).start()
    stack.callback(raw.stop)

    async with aiohttp.ClientSession() as http:

        async def healthy() -> bool:
            gateway.check()
            try:
                async with http.get(f"{url}/healthz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(healthy, 30.0, "the gateway to answer /healthz", interval=0.05)

    def raw_listening() -> bool:
        raw.check()
        return "listening" in raw.log_path.read_text()

    await wait_until(raw_listening, 30.0, "the raw SSE server to listen", interval=0.05)
    assert gateway.proc is not None and raw.proc is not None

    async def publish_raw(k: int) -> None:
        await nc.publish(RAW_SUBJECT, payload(k))
        await nc.flush()

    async def publish_gateway(k: int) -> None:
        await js.publish(subject, payload(k))

    await publish_raw(0)
    await js.publish(subject, payload(0))
    token = mint(SECRET, [HALL], ttl_s=3600)
    path = f"/v1/apps/{HALL}/status"

    baseline = await measure(
        "raw aiohttp",
        f"http://127.0.0.1:{raw_port}",
        "/sse",
        raw.proc.pid,
        publish_raw,
        sizes,
        None,
    )
    raw.check()

    async def consumers() -> dict:
        info = await js.stream_info(subjects.STATUS_STREAM)
        return {"status_consumers_while_open": info.state.consumer_count}

    try:
        spinyard = await measure(
            "spinyard gateway",
            url,
            path,
            gateway.proc.pid,
            publish_gateway,
            sizes,
            token,
            consumers,
        )
    except BenchError as exc:
        raise BenchError(f"{exc}\nthe gateway's last log lines:\n{gateway.tail()}") from None
    gateway.check()
    closed = time.monotonic()

    async def no_consumer() -> bool:
        return (await js.stream_info(subjects.STATUS_STREAM)).state.consumer_count == 0

    await wait_until(no_consumer, 30.0, "the status consumer to be deleted", interval=0.05)
    gone_s = time.monotonic() - closed
    return summarize(sizes, baseline, spinyard) | {"consumer_gone_s": gone_s}


def summarize(sizes: Sizes, baseline: dict, spinyard: dict) -> dict:
    opens = stats.add_ratios([baseline["open"], spinyard["open"]], baseline["open"])
    opens += stats.add_ratios(
        [baseline["open_single"], spinyard["open_single"]], baseline["open_single"]
    )
    changes = stats.add_ratios(
        [baseline["change_to_all"], spinyard["change_to_all"]], baseline["change_to_all"]
    )
    measured = {
        "rss_per_stream_kb": spinyard["rss_per_stream_kb"],
        "change_to_all_p50_ms": spinyard["change_to_all"]["p50_ms"],
        "open_p50_ms": spinyard["open_single"]["p50_ms"],
    }
    return {
        "bench": "fanout",
        "loadavg_1m_end": stats.machine()["loadavg_1m"],
        "sizes": asdict(sizes),
        "baseline": baseline,
        "spinyard": spinyard,
        "rows": [*opens, *changes],
        "open_all_ratio": stats.ratio(spinyard["open_all_s"], baseline["open_all_s"]),
        "rss_ratio": stats.ratio(spinyard["rss_per_stream_kb"], baseline["rss_per_stream_kb"]),
        "goals": {
            k: {"goal": GOALS[k], "measured": v, "met": v <= GOALS[k]} for k, v in measured.items()
        },
    }


def format_result(result: dict) -> str:
    b, s, n = result["baseline"], result["spinyard"], result["sizes"]["streams"]
    summary = [
        {
            "name": "open all streams (s)",
            "raw": b["open_all_s"],
            "gw": s["open_all_s"],
            "ratio": result["open_all_ratio"],
        },
        {
            "name": "RSS per stream (KB)",
            "raw": b["rss_per_stream_kb"],
            "gw": s["rss_per_stream_kb"],
            "ratio": result["rss_ratio"],
        },
    ]
    columns = (("figure", "name"), ("raw aiohttp", "raw"), ("spinyard", "gw"), ("ratio", "ratio"))
    goals = ", ".join(
        f"{k} {g['measured']:.2f} (goal <= {g['goal']}: {'met' if g['met'] else 'NOT met'})"
        for k, g in result["goals"].items()
    )
    lines = [
        f"fanout: {n} SSE streams on one status subject, {result['sizes']['workers']} client "
        f"processes, {result['sizes']['changes']} changes",
        stats.table(summary, columns),
        stats.table(result["rows"], stats.LATENCY_COLUMNS),
        f"ratios are to the raw aiohttp server. goals: {goals}",
        f"JetStream consumers on the status stream with all {n} open: "
        f"{s['status_consumers_while_open']}; none {result['consumer_gone_s']:.1f} s after "
        f"the last stream closed (the gateway's sse_linger_s: {LINGER_S} s)",
        stats.load_line(result),
    ]
    return "\n".join(lines)


def main(quick: bool = False, streams: int | None = None) -> dict:
    result = asyncio.run(run(sizes_for(streams, quick)))
    print(format_result(result), flush=True)
    return result
