"""Runs bench (issue 3): run requests accepted per second and request -> running, vs Celery.

spinyard: this process publishes `RunRequest`s for a job app whose command
is a trivial Python model (it computes a number and exits 0; no outputs)
and records when each run's `queued`, `running` and terminal status arrive
on a core subscription to `spinyard.v1.status.job.>`. The handlers
(`run_request run_start job_update run_cancel`) run in a subprocess with the local
backend, which starts one OS process per run, and a moto S3 server (in this
process, on a loopback thread) as the object store.

- latency: runs one after another (each waits for the previous to end);
- rates: `burst` requests published at once (concurrent acked JetStream
  publishes): publish acks per second, and runs per second that reached
  `queued` (accepted by the run_request handler: recorded and answered),
  `running` and an end state, each counted from the first publish.

Celery (`bench.celery_peer`) does the same with a trivial task; the ratios
are spinyard / Celery.
"""

import asyncio
import tempfile
import time
import uuid
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import msgpack
import nats

from bench import stats
from bench.stack import BenchError, handlers_process, stop_instances, wait_consumers
from dispatcher.bus import provision
from dispatcher.embedded.natsserver import NatsServer
from dispatcher.settings import NatsSettings
from schemas import subjects
from schemas.codec import encode
from schemas.events import RunRequest
from schemas.spec import AppSpec

APP = "bench/model"
KINDS = ["run_request", "run_start", "job_update", "run_cancel"]
MODEL = "import json; json.dumps({'answer': sum(range(1000))})"
TIMEOUT_S = 120.0
ENDS = ("succeeded", "failed", "cancelled", "timed_out")


@dataclass(frozen=True)
class Sizes:
    runs: int = 200  # sequential runs for the latencies
    burst: int = 200  # requests published at once for the rates
    warmup: int = 5


FULL = Sizes()
QUICK = Sizes(runs=30, burst=50, warmup=3)


def job_spec() -> AppSpec:
    return AppSpec(
        name=APP, kind="job", command=["{python}", "-c", MODEL], outputs=[], deadline_s=60
    )


def require_job_backend() -> None:
    """Raise BenchError naming what is missing if the local backend cannot run jobs."""
    from dispatcher.backends.local.backend import LocalBackend
    from handlers.ports import Backend

    names = ("submit_job", "cancel_job", "watch_jobs")
    missing = [n for n in names if getattr(LocalBackend, n) is getattr(Backend, n)]
    if missing:
        raise BenchError(
            "the local backend does not run jobs yet: dispatcher/backends/local.py "
            f"LocalBackend does not implement {', '.join(missing)} (it inherits "
            "handlers.ports.Backend's, which raise NotImplementedError or never report)"
        )


class Jobs:
    """When each job's states arrived (perf_counter), from a core status subscription."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, float]] = {}
        self.last: dict[str, dict] = {}
        self.changed = asyncio.Event()

    async def on_msg(self, msg) -> None:
        at = time.perf_counter()
        status = msgpack.unpackb(msg.data)
        self.seen.setdefault(status["job_id"], {}).setdefault(status["state"], at)
        self.last[status["job_id"]] = status
        self.changed.set()

    def ended(self, job_id: str) -> bool:
        return any(s in self.seen.get(job_id, {}) for s in ENDS)

    async def wait(self, job_ids: list[str], state: str) -> None:
        """Until every job has reached `state` (or ended); BenchError after TIMEOUT_S."""

        def done(j: str) -> bool:
            return state in self.seen.get(j, {}) or self.ended(j)

        try:
            async with asyncio.timeout(TIMEOUT_S):
                while not all(done(j) for j in job_ids):
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            where = Counter(self.last[j]["state"] if j in self.last else "none" for j in job_ids)
            raise BenchError(
                f"after {TIMEOUT_S:g} s, not all of {len(job_ids)} runs reached {state}: "
                f"last states {dict(where)}"
            ) from None
        failed = [self.last[j] for j in job_ids if "succeeded" not in self.seen[j]]
        if state in ENDS and failed:
            raise BenchError(f"{len(failed)} run(s) did not succeed, e.g. {failed[0]}")


def _request(i: int) -> tuple[str, bytes, dict]:
    """A run request with its job id set, as the gateway sets it."""
    job_id = f"j-{uuid.uuid4().hex[:24]}"
    event = RunRequest(app=APP, session="s-bench", inputs={"i": i}, job_id=job_id)
    return job_id, encode(event), {"Nats-Msg-Id": event.id}


async def _sequential(js, jobs: Jobs, n: int) -> tuple[dict[str, list[float]], int]:
    """Seconds from publish to each state, per state; and runs whose `running` was not seen."""
    took: dict[str, list[float]] = {"queued": [], "running": [], "succeeded": []}
    missed = 0
    subject = subjects.event(subjects.RUN_REQUEST, APP)
    for i in range(n):
        job_id, data, headers = _request(i)
        t0 = time.perf_counter()
        await js.publish(subject, data, headers=headers)
        await jobs.wait([job_id], "succeeded")
        for state, samples in took.items():
            if state in jobs.seen[job_id]:
                samples.append(jobs.seen[job_id][state] - t0)
        missed += "running" not in jobs.seen[job_id]
    return took, missed


async def _burst(js, jobs: Jobs, n: int) -> list[dict]:
    subject = subjects.event(subjects.RUN_REQUEST, APP)
    requests = [_request(i) for i in range(n)]
    ids = [job_id for job_id, _, _ in requests]
    t0 = time.perf_counter()
    await asyncio.gather(*(js.publish(subject, d, headers=h) for _, d, h in requests))
    published = time.perf_counter() - t0
    await jobs.wait(ids, "succeeded")

    def last(*states: str) -> float:
        return max(min(jobs.seen[j][s] for s in states if s in jobs.seen[j]) for j in ids) - t0

    return [
        stats.rate("published (JetStream acks)", n, published),
        stats.rate("queued (run_request handled)", n, last("queued")),
        stats.rate("running (or already ended)", n, last("running", *ENDS)),
        stats.rate("ended (succeeded)", n, last(*ENDS)),
    ]


async def run_spinyard(sizes: Sizes = FULL) -> dict:
    """spinyard's half of the runs bench."""
    require_job_backend()
    from dispatcher.embedded.s3server import S3Server

    with tempfile.TemporaryDirectory(prefix="spinyard-bench-runs-") as tmp:
        async with AsyncExitStack() as stack:
            tmp_path = Path(tmp)
            server = NatsServer(tmp_path / "nats").start()
            stack.callback(server.stop)
            s3 = S3Server().start()
            stack.callback(s3.stop)
            nc = await nats.connect(server.url, name="bench-runs")
            stack.push_async_callback(nc.close)
            js = nc.jetstream()
            nsettings = NatsSettings(url=server.url)
            await provision.ensure_streams(js, nsettings)
            state = await provision.ensure_state(js, nsettings)
            spec = job_spec()
            await state.apps.put(spec.name, spec)
            data_dir = tmp_path / "data"
            store = {"endpoint": s3.endpoint, "access_key": "bench", "secret_key": "bench-secret"}
            handlers = handlers_process(
                KINDS,
                server.url,
                data_dir,
                tmp_path,
                **{f"store__{k}": v for k, v in store.items()},
                store__bucket="bench-results",
            ).start()
            stack.push_async_callback(stop_instances, data_dir)
            stack.callback(handlers.stop)
            await wait_consumers(js, subjects.EVENTS_STREAM, KINDS, handlers)
            jobs = Jobs()
            await nc.subscribe(subjects.job_status("*"), cb=jobs.on_msg)

            await _sequential(js, jobs, sizes.warmup)
            took, missed = await _sequential(js, jobs, sizes.runs)
            rates = await _burst(js, jobs, sizes.burst)
            handlers.check()
    return {
        "latency": [
            stats.latency("run request -> queued", took["queued"]),
            stats.latency("run request -> running", took["running"], missed=missed),
            stats.latency("run request -> succeeded", took["succeeded"]),
        ],
        "rates": rates,
        "running_not_seen": missed,
    }


def _pairs(sp: dict, ce: dict) -> list[dict]:
    """spinyard / Celery for the like-for-like figures."""
    lat = {r["name"]: r for r in sp["latency"] + ce["latency"]}
    rate = {r["name"]: r for r in sp["rates"] + ce["rates"]}
    pairs = []
    for mine, theirs in [
        ("run request -> running", "submit -> task start"),
        ("run request -> succeeded", "submit -> result received"),
    ]:
        for q in ("p50_ms", "p99_ms"):
            a, b = lat[mine][q], lat[theirs][q]
            pairs.append({"name": f"{mine} / {theirs} ({q})", "spinyard": a, "celery": b})
    for mine, theirs in [
        ("published (JetStream acks)", "submitted (apply_async returned)"),
        ("running (or already ended)", "started (task body began)"),
        ("ended (succeeded)", "completed (results received)"),
    ]:
        a, b = rate[mine]["per_s"], rate[theirs]["per_s"]
        pairs.append({"name": f"{mine} / {theirs} (per s)", "spinyard": a, "celery": b})
    for p in pairs:
        p["ratio"] = stats.ratio(p["spinyard"], p["celery"])
    return pairs


async def run(sizes: Sizes = FULL, celery: bool = True) -> dict:
    """Both halves in this one run; a half that cannot run is reported with its error."""
    result: dict = {"bench": "runs", "machine": stats.machine(), "sizes": asdict(sizes)}
    try:
        result["spinyard"] = await run_spinyard(sizes)
    except BenchError as exc:
        result["spinyard"] = {"error": str(exc)}
    if celery:
        from bench import celery_peer  # imports celery, which the dev extra does not install

        csizes = celery_peer.Sizes(runs=sizes.runs, burst=sizes.burst, warmup=sizes.warmup)
        try:
            result["celery"] = await asyncio.to_thread(celery_peer.measure, csizes)
        except BenchError as exc:
            result["celery"] = {"error": str(exc)}
        if "error" not in result["spinyard"] and "error" not in result["celery"]:
            result["ratios"] = _pairs(result["spinyard"], result["celery"])
    result["loadavg_1m_end"] = stats.machine()["loadavg_1m"]
    return result


def format_result(result: dict) -> str:
    lines = ["runs: run request -> running and runs per second, spinyard and Celery (same run)"]
    for part in ("spinyard", "celery"):
        if part not in result:
            continue
        figures = result[part]
        lines.append(f"-- {part}" + (f" ({figures['worker']})" if "worker" in figures else ""))
        if "error" in figures:
            lines.append(f"   FAILED: {figures['error']}")
            continue
        lines.append(stats.table(figures["latency"], stats.LATENCY_COLUMNS[:4]))
        lines.append(stats.table(figures["rates"], stats.RATE_COLUMNS))
    if "ratios" in result:
        lines.append("-- spinyard / celery")
        columns = (("figure", "name"), ("spinyard", "spinyard"), ("celery", "celery"))
        lines.append(stats.table(result["ratios"], (*columns, ("ratio", "ratio"))))
    start, end = result["machine"]["loadavg_1m"], result["loadavg_1m_end"]
    lines.append(f"load average (1 min): {start:.2f} at start, {end:.2f} at end")
    return "\n".join(lines)


def failed(result: dict) -> list[str]:
    """The errors of the halves that could not run."""
    parts = ("spinyard", "celery")
    return [f"{p}: {result[p]['error']}" for p in parts if "error" in result.get(p, {})]


def main(quick: bool = False) -> dict:
    """Run and print both halves; `errors` in the result names a half that could not run."""
    result = asyncio.run(run(QUICK if quick else FULL))
    result["errors"] = failed(result)
    print(format_result(result), flush=True)
    return result
