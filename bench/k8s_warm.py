"""Kubernetes warm runners, simulated: how fast a pool refills, and what a run's start costs.

Part of `python -m bench.k8s_sim` (its `warm` section). kubesim's cluster runs
each warm runner's pod as a real local process at a loopback pod IP
(kubesim/processes.py), so the runners start, answer their readiness probe
and run their model for real; only the API server is emulated.

1. refill: `start_warm` for a whole pool at once, `concurrency` at a time (as
   pool_refill replicas would), each until its pod is ready: the wall time
   until the pool is full and each runner's p50;
2. hot path: `claim` + `submit_warm` of one run per runner, one after another,
   in a backend object of its own (run_start's process; the first run fills
   its Pod informer's cache and is not counted, as in a replica that has
   started a run before): the API calls per run by verb (the target: no
   create) and the p50 from claim to the runner's answer; then every run must
   succeed (the other backend object, job_update's, watches and deletes the
   used pods).

Processes on this machine share its cores with the emulator and the backend,
so the times are this machine's; calls per run are what carry over.
"""

import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable

import kubesim
from dispatcher.backends.base import JobLaunch
from dispatcher.backends.kubernetes.backend import KubernetesBackend
from dispatcher.backends.settings import KubernetesBackendSettings
from schemas.events import JobUpdate
from schemas.spec import AppSpec

Timed = Callable[..., object]


async def warm(
    settings: KubernetesBackendSettings, image: str, pool: int, concurrency: int, timed_all: Timed
) -> dict:
    """The `warm` section of the k8s bench (see the top)."""
    if pool < 2:
        raise SystemExit("--pool must be at least 2 (the first run is not counted)")
    spec = AppSpec(
        name="bench/warm",
        kind="job",
        image=image,
        command=["{python}", "-c", "pass"],
        pool={"size": pool},
    )
    runners = [f"i-{n:016x}" for n in range(pool)]
    jobs = [f"j-{n:024x}" for n in range(pool)]
    async with (
        kubesim.apiserver(remember_requests=False) as server,
        kubesim.Cluster(server),
    ):
        config = kubesim.configuration(server)
        # Two handler processes: pool_refill and job_update's (it starts the runners and
        # deletes used pods), and run_start's, whose calls are counted.
        backend = KubernetesBackend(settings, "https://apps.example.org", configuration=config)
        starter = KubernetesBackend(settings, "https://apps.example.org", configuration=config)
        await backend.setup()
        await starter.setup()
        ended: dict[str, str] = {}
        stopping, all_ended = asyncio.Event(), asyncio.Event()

        async def report(update: JobUpdate) -> None:
            if update.state in ("succeeded", "failed", "timed_out", "cancelled"):
                ended[update.job_id] = update.state
                if len(ended) == pool:
                    all_ended.set()

        watcher = asyncio.create_task(starter.watch_jobs(report, stopping), name="bench-watch")
        try:
            starts = [lambda r=r: starter.start_warm(r, spec, 120.0) for r in runners]
            samples, refill_wall = await timed_all(starts, concurrency)
            refill = {
                "pool": pool,
                "concurrency": concurrency,
                "wall_s": round(refill_wall, 3),
                "p50_ms": round(statistics.median(samples) * 1000, 1),
                "runners_per_s": round(pool / refill_wall, 1),
            }
            hot: list[float] = []
            for n, (runner, job_id) in enumerate(zip(runners, jobs, strict=True)):
                if n == 1:  # the first run filled run_start's cache (one list): count from here
                    backend.api.calls.clear()
                started = time.perf_counter()
                if not await backend.claim(runner):
                    raise SystemExit(f"warm runner {runner} could not be claimed")
                launch = JobLaunch(job_id, {"n": 1}, {}, 600.0)
                if not await backend.submit_warm(launch, spec, runner):
                    raise SystemExit(f"warm runner {runner} did not take its run")
                if n:
                    hot.append(time.perf_counter() - started)
            calls, counted = dict(backend.api.calls), pool - 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_ended.wait(), 120)
            if sorted(set(ended.values())) != ["succeeded"] or len(ended) != pool:
                raise SystemExit(f"warm runs did not all succeed: {ended}")
            for job_id in jobs:
                await backend.cancel_job(job_id)
        finally:
            stopping.set()
            await watcher
            await backend.cleanup()
            await starter.cleanup()
    per_run = {f"{v} {g or 'core'}/{r}": round(n / counted, 3) for (v, g, r), n in calls.items()}
    return {
        "refill": refill,
        "hot_path": {
            "runs": pool - 1,
            "p50_ms": round(statistics.median(hot) * 1000, 2),
            "max_ms": round(max(hot) * 1000, 2),
            "calls_per_run": per_run,
            "api_calls_per_run": round(sum(calls.values()) / counted, 3),
            "creates_per_run": round(
                sum(n for (v, _, _), n in calls.items() if v == "create") / counted, 3
            ),
        },
    }


def table(result: dict) -> str:
    refill, hot = result["refill"], result["hot_path"]
    calls = ", ".join(f"{k} {v:g}" for k, v in sorted(hot["calls_per_run"].items())) or "none"
    return "\n".join(
        [
            f"warm pool of {refill['pool']}: full in {refill['wall_s']:.2f} s "
            f"({refill['runners_per_s']:.1f} runners/s, {refill['concurrency']} at a time; "
            f"p50 {refill['p50_ms']:.0f} ms per runner)",
            f"warm run start (claim + hand-over): p50 {hot['p50_ms']:.2f} ms, "
            f"max {hot['max_ms']:.2f} ms; API calls per run {hot['api_calls_per_run']:g} "
            f"({calls}); creates per run {hot['creates_per_run']:g}",
        ]
    )
