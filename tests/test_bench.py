"""Smoke tests of the benchmark harness: each bench runs end to end at tiny sizes.

They check that the benches start and stop their processes and return rows
of the right shape with finite, positive figures. They assert nothing about
speed: that is measured by `python -m bench`, never in tests. The Celery half
of the runs bench is exercised by the bench itself (it needs redis-server).
"""

import math
import os
from pathlib import Path

from bench import (
    fanout,
    gateway,
    gateway_up,
    handlers,
    runs,
    sporadic,
    sse_memory,
    stats,
    viz,
    warm_local,
)


def _check_latency_rows(rows: list[dict]) -> None:
    for row in rows:
        assert row["n"] >= 1, row
        for key in ("p50_ms", "p99_ms", "mean_ms", "min_ms", "max_ms"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["min_ms"] <= row["p50_ms"] <= row["p99_ms"] <= row["max_ms"], row


async def test_viz_bench_runs_and_reports_every_figure():
    sizes = viz.Sizes(loads=20, warmup=2, block=10, cold=1, pool_loads=2, pool_size=1)
    result = await viz.run(sizes)

    rows = {row["name"]: row for row in result["rows"]}
    assert len(rows) == 7
    assert rows[result["baseline"]]["ratio_p50"] == 1.0
    assert rows["page load -> ready (warm, shared app)"]["n"] == 20
    assert rows["raw JetStream publish -> pull -> publish"]["n"] == 20
    assert rows["warm pool claim -> ready (per_session)"]["n"] == 2
    _check_latency_rows(result["rows"])
    for row in result["rows"]:
        assert math.isfinite(row["ratio_p50"]) and row["ratio_p50"] > 0
    assert 0 <= result["pool_misses"] <= 2
    assert result["machine"]["nproc"] >= 1
    text = viz.format_result(result)
    assert "page load -> ready (warm, shared app)" in text and "ratio p50" in text


def _runs_bench_processes() -> set[int]:
    """Processes of any runs bench (their command lines name its temp dir)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if b"spinyard-bench-runs-" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.add(int(pid))
        except OSError:
            pass  # gone meanwhile
    return found


async def test_runs_bench_spinyard_half_runs_and_reports_rates():
    sizes = runs.Sizes(runs=3, burst=5, warmup=1, seq_pool=2, pool=5)
    before = _runs_bench_processes()
    result = await runs.run(sizes, celery=False)
    assert _runs_bench_processes() - before == set()  # no warm runner or run left behind

    figures = result["spinyard"]
    assert "error" not in figures, figures.get("error")
    assert [row["name"] for row in figures["latency"]] == [
        "run request -> queued",
        "run request -> running",
        "run request -> succeeded",
        "  phase queued -> started",
        "  phase started -> running",
    ]
    assert figures["latency"][0]["n"] == 3 and figures["latency"][2]["n"] == 3
    _check_latency_rows(figures["latency"])
    warm = figures["warm"]
    assert warm["burst_warm"] == "5 of 5"  # the pool of 5 was full before the burst
    assert warm["latency"][-1]["name"] == "run request -> running (warm runs only)"
    assert warm["latency"][-1]["n"] >= 1  # at least the first sequential run found it full
    _check_latency_rows([row for row in warm["latency"] if row["n"]])
    for row in figures["rates"] + warm["rates"]:
        assert row["n"] == 5
        assert math.isfinite(row["per_s"]) and row["per_s"] > 0, row
    assert "error" not in result["raw_hops"], result["raw_hops"]["error"]
    raw = result["raw_hops"]["latency"]  # the same round trips in plain nats-py
    assert [row["name"] for row in raw] == [
        "raw hops: request -> queued",
        "raw hops: request -> running",
    ]
    assert [row["n"] for row in raw] == [3, 3]
    _check_latency_rows(raw)
    assert raw[0]["p50_ms"] < raw[1]["p50_ms"]  # queued comes before running
    floor = {row["name"]: row for row in result["floor"]}
    warm_over_raw = floor[
        "run request -> running (warm runs only) / raw hops: request -> running (p50_ms)"
    ]
    assert warm_over_raw["ratio"] == warm_over_raw["spinyard"] / raw[1]["p50_ms"]
    assert runs.failed(result) == []
    text = runs.format_result(result)
    assert "run request -> running" in text and "warm pools" in text and "raw hops" in text
    assert stats.percentile([1.0, 2.0, 3.0], 50) == 2.0


async def test_sporadic_bench_runs_and_reports_its_rows():
    result = await sporadic.run(sporadic.Sizes(loads=4, max_gap_s=0.1))

    rows = result["rows"]
    assert [row["n"] for row in rows] == [4, 4, 2]  # raw round trips, loads, follow-ons
    _check_latency_rows(rows)
    for row in rows:
        assert row["p99_over_p50"] >= 1.0
    assert rows[0]["ratio_p99"] == 1.0
    assert len(result["samples"]["gap_s"]) == 8 and all(
        0 <= gap <= 0.1 for gap in result["samples"]["gap_s"]
    )
    assert isinstance(result["met"], bool)
    assert "follow-on load 10 ms after another" in sporadic.format_result(result)


async def test_fanout_bench_runs_and_reports_against_raw_aiohttp():
    result = await fanout.run(fanout.Sizes(streams=40, changes=2, workers=2, single=5))

    assert result["spinyard"]["status_consumers_while_open"] == 1  # shared by all 40
    rows = {row["name"]: row for row in result["rows"]}
    assert len(rows) == 6
    assert rows["spinyard gateway: open -> first status"]["n"] == 40
    assert rows["raw aiohttp: one change -> all streams"]["n"] == 2
    _check_latency_rows(result["rows"])
    for side in ("baseline", "spinyard"):
        assert result[side]["open_all_s"] > 0 and result[side]["rss_kb_after"] > 0
        assert result[side]["closed_streams"] == 40
    assert set(result["goals"]) == {"rss_per_stream_kb", "change_to_all_p50_ms", "open_p50_ms"}
    assert "one change -> all streams" in fanout.format_result(result)


async def test_sse_memory_reports_what_an_open_stream_holds_and_whose():
    result = await sse_memory.measure(20, trace=True, top=3)

    assert result["streams"] == 20 and result["closed"] == 20
    assert result["traced_bytes_per_stream"] > 0 and len(result["top"]) == 3
    for row in result["top"]:
        assert row["file"] and isinstance(row["bytes_per_stream"], float)
    assert "bytes of Python objects per stream" in sse_memory.format_result(result)


async def test_handlers_bench_drains_each_backlog_and_reports_against_raw_pull():
    result = await handlers.run(handlers.Sizes(events=50))

    assert result["errors"] == [] and result["dead_letters"] == 0
    assert [row["name"] for row in result["rows"]] == ["page_load", "heartbeat", "run_request"]
    for row in result["rows"]:
        assert row["n"] == row["delivered"] == 50 and row["redelivered"] == 0
        assert row["outcomes"] == {f"{row['name']}/ok": 50.0}
        for key in ("per_s", "raw_per_s", "ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        # CPU time is counted in clock ticks (10 ms): 50 events may take less than one.
        assert math.isfinite(row["cpu_ms_per_event"]) and row["cpu_ms_per_event"] >= 0, row
        assert row["raw"]["delivered"] == 50
    assert "raw pull+ack /s" in handlers.format_result(result)


async def test_gateway_bench_runs_and_reports_its_rows_and_load_levels():
    sizes = gateway.Sizes(
        samples=10, warmup=2, block=10, opens=3, viewers=(1, 4), load_s=0.5, up=False
    )
    result = await gateway.run(sizes)

    rows = {row["name"]: row for row in result["rows"]}
    assert len(rows) == 7
    assert rows["spinyard POST /v1/events -> 202"]["n"] == 10
    assert rows["spinyard page load -> ready on open SSE"]["n"] == 10
    assert rows["spinyard open SSE -> first status"]["n"] == 3
    _check_latency_rows(result["rows"])
    for row in result["rows"]:
        assert math.isfinite(row["ratio_p50"]) and row["ratio_p50"] > 0
    assert [level["viewers"] for level in result["load"]] == [1, 4]
    for level in result["load"]:
        assert level["accepted"] > 0 and level["raw_accepted_per_s"] > 0, level
        assert level["settled"] == level["accepted"] and level["refused"] == 0, level
        assert level["drain_s"] is not None and level["backlog_at_stop"] >= 0
    assert result["dead_letters"] == 0
    text = gateway.format_result(result)
    assert "spinyard POST /v1/events -> 202" in text and "accepted/s" in text


async def test_the_up_phase_runs_on_its_own_and_reports_cpu_per_event():
    sizes = gateway.Sizes(load_s=0.5, up_viewers=2)
    result = await gateway_up.run(sizes)

    level = result["up"]
    assert level["viewers"] == 2 and level["accepted"] > 0 and level["raw_accepted_per_s"] > 0
    assert level["settled"] == level["accepted"] and level["refused"] == 0, level
    assert level["dead_lettered_total"] == 0
    for name in ("up", "nats", "bench"):  # CPU is counted in clock ticks: may be 0
        assert math.isfinite(level[f"{name}_cpu_ms_per_event"]), level
        assert level[f"{name}_cpu_ms_per_event"] >= 0, level
    assert "up CPU ms/event" in gateway_up.format_result(result)


async def test_warm_local_bench_times_refills_against_spawns_and_hands_over_at_once():
    result = await warm_local.run(refill_count=2, burst_size=3, cpu_runs=2)
    spawned, forked = result["latency"]
    assert (spawned["n"], forked["n"]) == (2, 2)
    assert spawned["ratio_p50"] == 1.0
    _check_latency_rows(result["latency"])
    sleeping, trivial, floor = result["rates"]
    assert sleeping["n"] == trivial["n"] == 3  # every hand-over answered "running"
    assert floor["n"] == 200
    for row in result["rates"]:
        assert math.isfinite(row["per_s"]) and row["per_s"] > 0, row
    warm, bare = result["cpu"]
    assert warm["n"] == bare["n"] == 2  # each handed over and run to its end
    assert warm["machine_cpu_ms"] > 0 and warm["handler_cpu_ms"] > 0, warm
    assert "start_warm, forked" in warm_local.format_result(result)
    assert "machine CPU ms each" in warm_local.format_result(result)
