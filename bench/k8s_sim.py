"""Kubernetes backend at scale, on the API emulator: create, the reconcile read, cleanup.

    python -m bench.k8s_sim --deployments 2000 --jobs 500 [--passes 5] [--pool 100] [--json PATH]
    python -m bench.k8s_sim --quick

Starts kubesim's API server emulator (kmock, with resourceVersions, paging
and watches) on a loopback port in this process, then drives a
`KubernetesBackend` through it, with the backend's default settings but for
the API address:

1. create: `start_viz` for every viz instance (every tenth a warm pool
   member) and `submit_job` for every run, `--concurrency` at a time;
2. reconcile read: `list_instances` `--passes` times, as the reaper does each
   tick; it must find every object;
3. cleanup: `stop_viz` / `cancel_job` of everything listed, then one more
   list, which must find nothing.

For each phase it reports the p50 time (per object for create and cleanup,
per pass for the read), the API calls per object, and the wall time. No
controller runs (nothing becomes ready), so this measures the backend and
the API round trips, not a cluster: the emulator answers from memory and
scans every object per request, so its time grows with the object count
where a real API server's would not. Calls per object are what carry over.

Then warm runners (`k8s_warm.py`), on an emulator of their own with
kubesim's cluster running each warm pod as a local process: how fast a pool
of `--pool` refills, and the API calls of a run's start from a warm pod.
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import kubesim
from bench import k8s_warm
from dispatcher import logs
from dispatcher.backends.base import JobLaunch
from dispatcher.backends.kubernetes.backend import KubernetesBackend
from dispatcher.backends.settings import KubernetesBackendSettings
from schemas.spec import AppSpec

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "registry.example.com/spinyard/bench:1"
QUICK = {"deployments": 50, "jobs": 20, "passes": 3, "pool": 10}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.k8s_sim", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--deployments", type=int, default=2000, help="viz instances to create")
    parser.add_argument("--jobs", type=int, default=500, help="runs to submit")
    parser.add_argument("--passes", type=int, default=5, help="list_instances passes to time")
    parser.add_argument("--concurrency", type=int, default=8, help="operations in flight at once")
    parser.add_argument("--pool", type=int, default=100, help="warm runners to start and use")
    parser.add_argument("--quick", action="store_true", help=f"small sizes: {QUICK}")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    return args


async def timed_all(
    jobs: list[Callable[[], Awaitable[object]]], concurrency: int
) -> tuple[list[float], float]:
    """Run the jobs `concurrency` at a time: (each one's seconds, the wall time)."""
    gate = asyncio.Semaphore(concurrency)
    times: list[float] = []

    async def one(job: Callable[[], Awaitable[object]]) -> None:
        async with gate:
            started = time.perf_counter()
            await job()
            times.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(job) for job in jobs))
    return times, time.perf_counter() - started


def calls(backend: KubernetesBackend) -> int:
    return sum(backend.api.calls.values())


def row(name: str, samples: list[float], wall_s: float, api_calls: int, objects: int) -> dict:
    return {
        "name": name,
        "n": len(samples),
        "p50_ms": round(statistics.median(samples) * 1000, 3),
        "max_ms": round(max(samples) * 1000, 3),
        "wall_s": round(wall_s, 3),
        "api_calls": api_calls,
        "calls_per_object": round(api_calls / max(1, objects), 3),
    }


async def run(args: argparse.Namespace) -> dict:
    viz = AppSpec(name="bench/viz", image=IMAGE, command=["serve", "--port", "{port}"])
    model = AppSpec(name="bench/model", kind="job", image=IMAGE, command=["run"])
    instance_ids = [f"i-{n:016x}" for n in range(args.deployments)]
    job_ids = [f"j-{n:024x}" for n in range(args.jobs)]
    total = len(instance_ids) + len(job_ids)
    settings = KubernetesBackendSettings(pod_templates_dir=ROOT / "k8s/base/pod-templates")

    async with kubesim.apiserver(remember_requests=False) as server:
        backend = KubernetesBackend(
            settings, "https://apps.example.org", configuration=kubesim.configuration(server)
        )
        await backend.setup()
        try:
            before = calls(backend)
            creates = [
                lambda iid=iid, n=n: backend.start_viz(iid, viz, pooled=n % 10 == 0)
                for n, iid in enumerate(instance_ids)
            ] + [
                lambda jid=jid: backend.submit_job(
                    JobLaunch(jid, {"n": 1}, {"out.txt": "http://minio.test/x"}, 600.0), model
                )
                for jid in job_ids
            ]
            samples, wall = await timed_all(creates, args.concurrency)
            create = row("create", samples, wall, calls(backend) - before, total)

            samples, per_pass = [], []
            for _ in range(args.passes):
                before = calls(backend)
                started = time.perf_counter()
                found = await backend.list_instances()
                samples.append(time.perf_counter() - started)
                per_pass.append(calls(backend) - before)
                if len(found) != total:
                    raise SystemExit(f"list_instances found {len(found)} of {total} objects")
            listing = row("list_instances", samples, sum(samples), per_pass[0], total)
            listing |= {"found": len(found), "calls_per_pass": per_pass[0]}

            before = calls(backend)
            stops = [
                (lambda i=i: backend.stop_viz(i.id))
                if i.kind == "viz"
                else (lambda i=i: backend.cancel_job(i.id))
                for i in found
            ]
            samples, wall = await timed_all(stops, args.concurrency)
            cleanup = row("cleanup", samples, wall, calls(backend) - before, total)
            left = await backend.list_instances()
            if left:
                raise SystemExit(f"{len(left)} objects left after the cleanup pass")
        finally:
            await backend.cleanup()
    warm = await k8s_warm.warm(settings, IMAGE, args.pool, args.concurrency, timed_all)
    return {
        "bench": "k8s_sim",
        "deployments": args.deployments,
        "jobs": args.jobs,
        "passes": args.passes,
        "concurrency": args.concurrency,
        "python": sys.version.split()[0],
        "create": create,
        "list_instances": listing,
        "cleanup": cleanup,
        "warm": warm,
        "calls": {
            f"{v} {g or 'core'}/{r}": n for (v, g, r), n in sorted(backend.api.calls.items())
        },
    }


def table(result: dict) -> str:
    head = f"{'phase':<16}{'n':>7}{'p50 ms':>10}{'max ms':>10}{'wall s':>9}{'calls/obj':>11}"
    lines = [
        f"k8s_sim: {result['deployments']} deployments, {result['jobs']} jobs, "
        f"{result['passes']} list passes, concurrency {result['concurrency']}",
        head,
        "-" * len(head),
    ]
    for name in ("create", "list_instances", "cleanup"):
        r = result[name]
        lines.append(
            f"{name:<16}{r['n']:>7}{r['p50_ms']:>10.1f}{r['max_ms']:>10.1f}"
            f"{r['wall_s']:>9.2f}{r['calls_per_object']:>11.3f}"
        )
    lines.append(f"list_instances: {result['list_instances']['calls_per_pass']} API calls per pass")
    lines.append(k8s_warm.table(result["warm"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logs.configure("console", "warning")
    result = asyncio.run(run(args))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.write(table(result) + "\n" + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
