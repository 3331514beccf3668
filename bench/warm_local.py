"""Warm runners on the local backend, driven directly: refills, and hand-overs at once.

No NATS and no handlers: a `LocalBackend` in this process, a job app whose
model is `{python} model.py` with `json` preloaded, in `TMPDIR`.

- refill: `start_warm` one after another while a runner waits, with
  `warm_fork_max_age_s` 0 (every runner starts its own interpreter: the
  baseline, same run) and 300 (forked from the waiting one). The first start
  of each has no runner to fork from and is left out.
- burst: `burst` runners started, claimed, then all handed a run at once
  (`submit_warm` concurrently); the time until every one has answered
  `running`, and the CPU this process (the handler's side) used meanwhile. Once
  with a model that sleeps (no run ends during the burst), once with the
  trivial model (runs end, and their runners report, during it).
- floor: a bare `os.fork()` of this process that runs the trivial model and
  exits, one after another: what a process of its own per run costs before
  spinyard does anything.
- CPU per run (first, so nothing of the rest is still exiting): `--runs`
  warm runs of the trivial model handed over one
  after another, each waited for to its end (result.json), with the
  machine's busy CPU time (/proc/stat: every process and the kernel, so the
  runner, the model, their exits and this process) divided by the runs,
  and each hand-over's time (`submit_warm` until it says `running`);
  the floor above is measured the same way in the same run. Run it on an
  otherwise idle machine: whatever else runs is counted too.

    python -m bench.warm_local                 # 20 refills, bursts of 50, 40 runs for CPU
    python -m bench.warm_local --burst 100 --json warm.json
"""

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from bench import stats
from bench.stack import wait_until
from dispatcher import logs
from dispatcher.backends.local.backend import LocalBackend
from dispatcher.backends.settings import LocalBackendSettings
from handlers.ports import JobLaunch
from schemas.spec import AppSpec

TRIVIAL = "import json\njson.dumps({'answer': sum(range(1000))})\n"
SLEEPS = "import time\ntime.sleep(5)\n"
READY_S = 30.0


def _spec(workdir: Path, script: str) -> AppSpec:
    return AppSpec.model_validate({
        "name": "bench/warm", "kind": "job", "command": ["{python}", script],
        "workdir": str(workdir), "pool": {"size": 1}, "preload": ["json"],
    })  # fmt: skip


def _ids(n: int, prefix: str = "i-", size: int = 16) -> list[str]:
    return [f"{prefix}{uuid.uuid4().hex[:size]}" for _ in range(n)]


async def refills(root: Path, count: int, fork_max_age_s: float) -> dict:
    """`start_warm` p50 of `count` refills (after the first) with forking as given."""
    settings = LocalBackendSettings(warm_fork_max_age_s=fork_max_age_s)
    backend = LocalBackend(settings, str(root / f"refill-{fork_max_age_s:g}"), "http://127.0.0.1:1")
    await backend.setup()
    spec, took, ids = _spec(root, "model.py"), [], _ids(count + 1)
    try:
        for instance in ids:
            start = time.perf_counter()
            await backend.start_warm(instance, spec, READY_S)
            took.append(time.perf_counter() - start)
    finally:
        for instance in ids:
            await backend.stop_viz(instance)
        await backend.cleanup()
    how = "forked" if fork_max_age_s > 0 else "spawned (baseline)"
    return stats.latency(f"start_warm, {how}", took[1:])


async def burst(root: Path, count: int, script: str, name: str) -> dict:
    """`count` hand-overs at once: until all answered, and the CPU spent meanwhile."""
    backend = LocalBackend(
        LocalBackendSettings(), str(root / f"burst-{name}"), "http://127.0.0.1:1"
    )
    await backend.setup()
    spec, ids = _spec(root, script), _ids(count)
    for instance in ids:
        await backend.start_warm(instance, spec, READY_S)
        assert await backend.claim(instance)
    ours_before = time.process_time()

    async def hand(instance: str) -> str | None:
        launch = JobLaunch(job_id=_ids(1, "j-", 24)[0], inputs={}, upload_urls={}, deadline_s=60)
        return await backend.submit_warm(launch, spec, instance)

    start = time.perf_counter()
    answers = await asyncio.gather(*(hand(i) for i in ids))
    seconds = time.perf_counter() - start
    ours = time.process_time() - ours_before
    for job in await backend.list_instances():
        if job.kind == "job":
            await backend.cancel_job(job.id)
    await backend.cleanup()
    return stats.rate(
        f"{count} hand-overs at once, {name} model: all running",
        sum(a == "running" for a in answers),
        seconds,
        handler_cpu_ms=ours * 1e3 / count,
    )


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy since boot (all but idle and iowait)."""
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _floor_once() -> None:
    pid = os.fork()
    if pid == 0:
        json.dumps({"answer": sum(range(1000))})
        os._exit(0)
    os.waitpid(pid, 0)


def fork_floor(count: int) -> dict:
    """A bare fork that runs the trivial model and exits, one after another."""
    start = time.perf_counter()
    for _ in range(count):
        _floor_once()
    return stats.rate(
        "bare fork + trivial model + exit, one after another", count, time.perf_counter() - start
    )


async def cpu_per_run(root: Path, count: int) -> list[dict]:
    """Machine CPU per warm run handed over and run to its end, one after another, and per
    bare fork of the floor, measured the same way."""
    backend = LocalBackend(LocalBackendSettings(), str(root / "cpu"), "http://127.0.0.1:1")
    await backend.setup()
    spec, ids = _spec(root, "model.py"), _ids(count)
    for instance in ids:
        await backend.start_warm(instance, spec, READY_S)
        assert await backend.claim(instance)
    await asyncio.sleep(0.5)  # the runners' set-up is over
    jobs = root / "cpu" / "local" / "jobs"
    busy, ours, took = busy_cpu_s(), time.process_time(), []
    for instance in ids:
        job_id = _ids(1, "j-", 24)[0]
        launch = JobLaunch(job_id=job_id, inputs={}, upload_urls={}, deadline_s=60)
        start = time.perf_counter()
        assert await backend.submit_warm(launch, spec, instance) == "running"
        took.append(time.perf_counter() - start)
        done = jobs / job_id / "result.json"
        await wait_until(done.exists, READY_S, f"{job_id} to end", interval=0.002)
    await asyncio.sleep(0.2)  # the runners' exits
    machine, ours = busy_cpu_s() - busy, time.process_time() - ours
    await backend.cleanup()
    floor_busy = busy_cpu_s()
    for _ in range(count):
        _floor_once()
    floor = busy_cpu_s() - floor_busy
    took.sort()
    return [
        {"name": "warm run to its end, one after another", "n": count,
         "machine_cpu_ms": machine * 1e3 / count, "handler_cpu_ms": ours * 1e3 / count,
         "x_floor": machine / floor if floor > 0 else None,
         "hand_over_p50_ms": took[len(took) // 2] * 1e3},
        {"name": "bare fork + trivial model + exit (floor)", "n": count,
         "machine_cpu_ms": floor * 1e3 / count},
    ]  # fmt: skip


async def run(refill_count: int = 20, burst_size: int = 50, cpu_runs: int = 40) -> dict:
    machine = stats.machine()
    with tempfile.TemporaryDirectory(prefix="spinyard-bench-warm-") as tmp:
        root = Path(tmp)
        (root / "model.py").write_text(TRIVIAL)
        (root / "sleeps.py").write_text(SLEEPS)
        cpu = await cpu_per_run(root, cpu_runs)  # first: nothing of the others still exiting
        latency = [await refills(root, refill_count, age) for age in (0.0, 300.0)]
        stats.add_ratios(latency, latency[0])
        rates = [
            await burst(root, burst_size, "sleeps.py", "sleeping"),
            await burst(root, burst_size, "model.py", "trivial"),
            fork_floor(200),
        ]
    return {
        "bench": "warm_local",
        "machine": machine,
        "loadavg_1m_end": stats.machine()["loadavg_1m"],
        "latency": latency,
        "rates": rates,
        "cpu": cpu,
    }


def format_result(result: dict) -> str:
    return "\n".join([
        stats.table(result["latency"], (("name", "name"), ("n", "n"), ("p50 ms", "p50_ms"),
                    ("p99 ms", "p99_ms"), ("ratio p50", "ratio_p50"))),
        stats.table(result["rates"], (("name", "name"), ("n", "n"), ("seconds", "seconds"),
                    ("per s", "per_s"), ("handler CPU ms each", "handler_cpu_ms"))),
        stats.table(result["cpu"], (("name", "name"), ("n", "n"),
                    ("machine CPU ms each", "machine_cpu_ms"), ("ratio to floor", "x_floor"),
                    ("handler CPU ms each", "handler_cpu_ms"),
                    ("submit_warm -> running p50 ms", "hand_over_p50_ms"))),
        stats.load_line(result),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.warm_local", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--refills", type=int, default=20, help="default: 20")
    parser.add_argument("--burst", type=int, default=50, help="default: 50")
    parser.add_argument("--runs", type=int, default=40, help="runs for CPU per run; default: 40")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the result here")
    args = parser.parse_args(argv)
    logs.configure("console", "warning")
    result = asyncio.run(run(args.refills, args.burst, args.runs))
    print(format_result(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    bursts = [r for r in result["rates"] if "hand-overs" in r["name"]]
    return 0 if all(r["n"] == args.burst for r in bursts) else 1


if __name__ == "__main__":
    sys.exit(main())
