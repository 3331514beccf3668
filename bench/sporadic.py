"""Sporadic bench (issue 8): warm page loads at random gaps of 0-3 s, as real viewers send them.

The viz bench sends page loads back to back, which never shows a stall that
needs an idle consumer: a long-poll pull request waiting on the server when
the event arrives. Here every step waits a gap drawn uniformly from 0 to
`max_gap_s` seconds (seeded: two runs wait the same gaps) and then does one
of, in turn:

- a page load of a shared app that already runs (examples/hello);
- a raw core NATS request/reply answered by the peer process: the same-run
  baseline, because waking idle processes on a busy machine costs time too;
- a page load followed 10 ms later by one of a second shared app: the
  "follow-on" row, the shape that stalled most (a load shortly after another);
- another raw request/reply.

Processes as in the viz bench: nats-server, `spinyard handlers`, the raw
peer, the app instances. The goal: page load p99 within 3 times its p50.
"""

import asyncio
import random
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import nats_peer, stats
from bench.stack import Process, clean_env, wait_consumers
from bench.viz import SHARED, TIMEOUT_S, Page, bench_specs, is_ready, page_load, start_page
from schemas import subjects
from schemas.codec import encode
from schemas.events import PageLoad

SECOND = "bench/second"  # a second shared app, for the follow-on loads
FOLLOW_S = 0.010  # the follow-on load comes this long after the first one's publish
GOAL = 3.0  # p99 / p50


@dataclass(frozen=True)
class Sizes:
    loads: int = 30  # timed page loads; as many raw round trips, loads // 2 follow-ons
    max_gap_s: float = 3.0
    seed: int = 8


FULL = Sizes()  # 60 gaps: about 90 s
QUICK = Sizes(loads=12)


async def follow_on(page: Page, i: int) -> tuple[float, float]:
    """A load of SHARED and, 10 ms later, of SECOND: seconds each took to `ready`."""
    first, second = PageLoad(app=SHARED, session=f"s-a{i}"), PageLoad(app=SECOND, session=f"s-b{i}")
    page.status.clear()
    t0 = time.perf_counter()
    await page.js.publish(
        subjects.event(subjects.PAGE_LOAD, SHARED), encode(first), headers={"Nats-Msg-Id": first.id}
    )
    await asyncio.sleep(FOLLOW_S - (time.perf_counter() - t0))
    t1 = time.perf_counter()
    await page.js.publish(
        subjects.event(subjects.PAGE_LOAD, SECOND),
        encode(second),
        headers={"Nats-Msg-Id": second.id},
    )
    want = {subjects.app_status(SHARED, None): t0, subjects.app_status(SECOND, None): t1}
    took: dict[str, float] = {}
    while len(took) < 2:
        at, status = await page.status.until(lambda s, st: s in want and is_ready(s)(s, st))
        subject = subjects.app_status(status["app"], None)
        took.setdefault(subject, at - want[subject])
    return took[subjects.app_status(SHARED, None)], took[subjects.app_status(SECOND, None)]


async def run(sizes: Sizes = FULL) -> dict:
    """Run the sporadic bench; the result dict holds its rows (ms) and what it waited."""
    machine = stats.machine()
    specs = bench_specs(pool_size=0)
    second = specs[SHARED].model_copy(update={"name": SECOND})
    with tempfile.TemporaryDirectory(prefix="spinyard-bench-sporadic-") as tmp:
        async with AsyncExitStack() as stack:
            page = await start_page(Path(tmp), stack, {SHARED: specs[SHARED], SECOND: second}, 1)
            await nats_peer.setup(page.js)
            peer = Process(
                "raw NATS peer",
                [sys.executable, "-m", "bench.nats_peer", page.server.url],
                clean_env({}),
                Path(tmp) / "peer.log",
            ).start()
            stack.callback(peer.stop)
            await wait_consumers(page.js, nats_peer.JS_STREAM, [nats_peer.JS_DURABLE], peer)
            payload = encode(PageLoad(app=SHARED, session="s-raw"))

            async def raw_rr() -> float:
                t0 = time.perf_counter()
                await page.nc.request(nats_peer.RR_SUBJECT, payload, timeout=TIMEOUT_S)
                return time.perf_counter() - t0

            # Both apps started (untimed), then one more load each as a warm-up.
            for _ in range(2):
                await page_load(page.js, page.status, SHARED, "s-warm")
                await page_load(page.js, page.status, SECOND, "s-warm", shared=True)
                await raw_rr()
            rng = random.Random(sizes.seed)
            loads, follows, raw, gaps = [], [], [], []
            started = time.perf_counter()
            for i in range(2 * sizes.loads):
                gap = rng.uniform(0, sizes.max_gap_s)
                gaps.append(gap)
                await asyncio.sleep(gap)
                if i % 2:
                    raw.append(await raw_rr())
                elif i % 4 == 2:
                    took, after = await follow_on(page, i)
                    loads.append(took)
                    follows.append(after)
                else:
                    loads.append((await page_load(page.js, page.status, SHARED, f"s-{i}"))[0])
            elapsed = time.perf_counter() - started
            page.handlers.check()
    rows = [
        stats.latency("raw request/reply, same gaps (peer process)", raw),
        stats.latency("page load -> ready, gaps 0-3 s (warm, shared)", loads),
        stats.latency("  follow-on load 10 ms after another", follows),
    ]
    for row in rows:
        row["p99_over_p50"] = stats.ratio(row["p99_ms"], row["p50_ms"])
    stats.add_ratios(rows, rows[0])
    return {
        "bench": "sporadic",
        "machine": machine,
        "loadavg_1m_end": stats.machine()["loadavg_1m"],
        "sizes": asdict(sizes),
        "rows": rows,
        "goal_p99_over_p50": GOAL,
        "met": rows[1]["p99_over_p50"] <= GOAL and rows[2]["p99_over_p50"] <= GOAL,
        "seconds": elapsed,
        "mean_gap_s": sum(gaps) / len(gaps),
        "samples": {  # in order, with the gap before each, for finding what a slow one met
            "gap_s": gaps,
            "load_ms": [x * 1000 for x in loads],
            "follow_on_ms": [x * 1000 for x in follows],
            "raw_ms": [x * 1000 for x in raw],
        },
    }


COLUMNS = (
    *stats.LATENCY_COLUMNS[:4],
    ("max ms", "max_ms"),
    ("p99/p50", "p99_over_p50"),
    ("p99 / raw p99", "ratio_p99"),
)


def format_result(result: dict) -> str:
    lines = [
        "sporadic: page loads at random gaps (seeded), p99 against p50",
        stats.table(result["rows"], COLUMNS),
        f"goal: page load p99 within {result['goal_p99_over_p50']:g}x p50: "
        f"{'met' if result['met'] else 'NOT met'}; {result['seconds']:.0f} s, "
        f"mean gap {result['mean_gap_s']:.2f} s",
        stats.load_line(result),
    ]
    return "\n".join(lines)


def main(quick: bool = False, loads: int | None = None) -> dict:
    sizes = QUICK if quick else FULL
    if loads is not None:
        sizes = Sizes(loads=loads, max_gap_s=sizes.max_gap_s, seed=sizes.seed)
    result = asyncio.run(run(sizes))
    print(format_result(result), flush=True)
    return result
