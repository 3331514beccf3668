"""Runs bench (issue 3): run requests accepted per second and request -> running, vs Celery.

spinyard: this process publishes `RunRequest`s for a job app whose command
is a trivial Python model (it computes a number and exits 0; no outputs)
and records when each run's `queued`, `running` and terminal status arrive
on a core subscription to `spinyard.v1.status.job.>`. The handlers run in
three subprocesses, as a deployment scales them (k8s/ has a Deployment per
kind): `run_request` alone (acceptance); `run_start job_update run_cancel`
with the local backend, which starts one OS process per run; and
`pool_refill reaper_tick` (warm runners' starts and the reaper's passes, so
neither stalls the starts' event loop). A moto S3 server (in this process,
on a loopback thread) is the object store.

- latency: runs one after another (each waits for the previous to end);
- rates: `burst` requests published at once (concurrent acked JetStream
  publishes): publish acks per second, and runs per second that reached
  `queued` (accepted by the run_request handler: recorded and answered),
  `running` and an end state, each counted from the first publish.

Warm runners (issue 10): the same again for job apps with a warm pool
(`pool.size`, the model's `json` preloaded), with the same handler processes
once the cold figures are taken (reaper every 0.5 s, up to 20 refills per
app per pass): the sequential
runs take a pool of `Sizes.seq_pool` (4), the burst a pool of `Sizes.pool`
(100, the most a spec allows, filled before the burst; runs past it start
cold or on refills). Each figure says how many runs started warm
(`phases.warm`). The model is a script (`{python} model.py`) for both apps,
so the warm one is forked from its runner; the cold one is exec'd as ever.

Phases: from each sequential run's last status, `queued -> started` (the
run_start handler: queue, slots, the claim of a warm runner) and `started ->
running` (the backend's start and its report: for a warm start, the
runner's answer to the hand-over), in ms.

Celery (`bench.celery_peer`) does the same with a trivial task; the ratios
are spinyard / Celery.

The floor (`bench.chain_peer`): a warm start's bus round trips (acceptance's
KV create beside its spec read, `queued` beside the start event, the pool's
compare-and-set, a unix-socket hand-over, the record's compare-and-set, the
`running` status) taken by plain nats-py processes with nothing else, the
same number of runs one after another; spinyard's warm start over it says
how much of a warm start is the machine's round trips and how much is
spinyard's own work (the runner's files, the model's start, the handlers).

The local backend keeps its processes' state under the data dir (on the
temporary directory's file system) unless `SPINYARD_BENCH_STATE_DIR` names a
directory (say /dev/shm, a tmpfs) to make a fresh `backend.local.state_dir` in.
"""

import asyncio
import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import msgpack
import nats

from bench import chain_peer, stats
from bench.runs_report import floor, format_result, pairs
from bench.stack import BenchError, handlers_process, stop_instances, wait_consumers
from dispatcher.bus import provision
from dispatcher.embedded.natsserver import NatsServer
from dispatcher.settings import NatsSettings
from schemas import subjects
from schemas.codec import encode
from schemas.events import RunRequest
from schemas.spec import AppSpec

APP = "bench/model"
WARM_APP, BURST_APP = "bench/warm", "bench/warmburst"
ACCEPT = ["run_request"]  # in a process of its own: acceptance does not wait for starts
KINDS = ["run_start", "job_update", "run_cancel"]
KEEPERS = ["pool_refill", "reaper_tick"]  # the pools and the reaper, in a third process
MODEL = "import json\njson.dumps({'answer': sum(range(1000))})\n"
TIMEOUT_S = 120.0
ENDS = ("succeeded", "failed", "cancelled", "timed_out")


@dataclass(frozen=True)
class Sizes:
    runs: int = 200  # sequential runs for the latencies
    burst: int = 200  # requests published at once for the rates
    warmup: int = 5
    seq_pool: int = 4  # warm runners of the app the sequential warm runs use
    pool: int = 100  # warm runners of the app the warm burst uses (at most 100)


FULL = Sizes()
QUICK = Sizes(runs=30, burst=50, warmup=3, pool=50)


def job_spec(workdir: Path, name: str = APP, pool: int = 0) -> AppSpec:
    """The trivial model, `{python} model.py` in `workdir`; with `pool` warm runners."""
    extra = {"pool": {"size": pool}, "preload": ["json"]} if pool else {}
    return AppSpec(
        name=name,
        kind="job",
        command=["{python}", "model.py"],
        workdir=str(workdir),
        outputs=[],
        deadline_s=60,
        **extra,
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


def _request(i: int, app: str = APP) -> tuple[str, bytes, dict]:
    """A run request with its job id set, as the gateway sets it."""
    job_id = f"j-{uuid.uuid4().hex[:24]}"
    event = RunRequest(app=app, session="s-bench", inputs={"i": i}, job_id=job_id)
    return job_id, encode(event), {"Nats-Msg-Id": event.id}


async def _sequential(
    js, jobs: Jobs, n: int, app: str = APP
) -> tuple[dict[str, list[float]], int, dict[str, float]]:
    """Seconds from publish to each state, per state (and per phase, from the status's
    `phases`); runs whose `running` was not seen; each job id's publish time."""
    took: dict[str, list[float]] = {"queued": [], "running": [], "succeeded": []}
    took |= {"queued->started": [], "started->running": []}
    missed, ids = 0, {}
    subject = subjects.event(subjects.RUN_REQUEST, app)
    for i in range(n):
        job_id, data, headers = _request(i, app)
        ids[job_id] = t0 = time.perf_counter()
        await js.publish(subject, data, headers=headers)
        await jobs.wait([job_id], "succeeded")
        for state in ("queued", "running", "succeeded"):
            if state in jobs.seen[job_id]:
                took[state].append(jobs.seen[job_id][state] - t0)
        phases = jobs.last[job_id].get("phases") or {}
        for a, b in (("queued", "started"), ("started", "running")):
            if phases.get(a) and phases.get(b):
                took[f"{a}->{b}"].append(phases[b] - phases[a])
        missed += "running" not in jobs.seen[job_id]
    return took, missed, ids


def _warm_count(jobs: Jobs, ids: list[str]) -> int:
    """How many of the runs started on a warm runner (their last status's `phases.warm`)."""
    return sum(bool((jobs.last[j].get("phases") or {}).get("warm")) for j in ids)


async def _pool_filled(state, app: str, n: int) -> float:
    """Seconds until `app`'s pool lists `n` warm runners; BenchError after TIMEOUT_S."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < TIMEOUT_S:
        index = await state.pools.get(app)
        if index is not None and len(index.warm) >= n:
            return time.perf_counter() - t0
        await asyncio.sleep(0.05)
    raise BenchError(f"the pool of {app} did not fill to {n} within {TIMEOUT_S:g} s")


async def _burst(
    js, jobs: Jobs, n: int, app: str = APP, first: int = 0
) -> tuple[list[dict], list[str]]:
    """The burst's rates; with `first`, also the rate at which its first `first` runs were
    running (as many as a warm pool holds)."""
    subject = subjects.event(subjects.RUN_REQUEST, app)
    requests = [_request(i, app) for i in range(n)]
    ids = [job_id for job_id, _, _ in requests]
    t0 = time.perf_counter()
    await asyncio.gather(*(js.publish(subject, d, headers=h) for _, d, h in requests))
    published = time.perf_counter() - t0
    await jobs.wait(ids, "succeeded")

    def last(*states: str) -> float:
        return max(min(jobs.seen[j][s] for s in states if s in jobs.seen[j]) for j in ids) - t0

    rows = [
        stats.rate("published (JetStream acks)", n, published),
        stats.rate("queued (run_request handled)", n, last("queued")),
        stats.rate("running (or already ended)", n, last("running", *ENDS)),
        stats.rate("ended (succeeded)", n, last(*ENDS)),
    ]
    if 0 < first < n:
        began = sorted(
            min(jobs.seen[j][s] for s in ("running", *ENDS) if s in jobs.seen[j]) for j in ids
        )
        rows.insert(3, stats.rate(f"first {first} running", first, began[first - 1] - t0))
    return rows, ids


def _latencies(took: dict[str, list[float]], missed: int, note: str = "") -> list[dict]:
    return [
        stats.latency(f"run request -> queued{note}", took["queued"]),
        stats.latency(f"run request -> running{note}", took["running"], missed=missed),
        stats.latency(f"run request -> succeeded{note}", took["succeeded"]),
        stats.latency(f"  phase queued -> started{note}", took["queued->started"]),
        stats.latency(f"  phase started -> running{note}", took["started->running"]),
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
            (tmp_path / "model.py").write_text(MODEL)
            spec = job_spec(tmp_path)
            await state.apps.put(spec.name, spec)
            data_dir = tmp_path / "data"
            store = {"endpoint": s3.endpoint, "access_key": "bench", "secret_key": "bench-secret"}
            settings = {f"store__{k}": v for k, v in store.items()} | {
                "store__bucket": "bench-results",
                "reaper__interval_s": "0.5",
                "reaper__pool_refill_per_tick": "20",
            }
            state_dir = None
            if os.environ.get("SPINYARD_BENCH_STATE_DIR"):  # e.g. /dev/shm: see the docstring
                base = os.environ["SPINYARD_BENCH_STATE_DIR"]
                state_dir = Path(tempfile.mkdtemp(prefix="spinyard-bench-", dir=base))
                stack.callback(shutil.rmtree, state_dir, True)  # last: after the stops below
                settings["backend__local__state_dir"] = str(state_dir)
            (tmp_path / "accept").mkdir()
            accept = handlers_process(
                ACCEPT, server.url, data_dir, tmp_path / "accept", **settings
            ).start()
            stack.callback(accept.stop)
            # Every instance is stopped once no handler process runs (the pools' keeper
            # would refill them): callbacks run last to first.
            stack.push_async_callback(stop_instances, data_dir, state_dir)
            (tmp_path / "keepers").mkdir()
            keepers = handlers_process(
                KEEPERS, server.url, data_dir, tmp_path / "keepers", **settings
            ).start()
            stack.callback(keepers.stop)
            handlers = handlers_process(KINDS, server.url, data_dir, tmp_path, **settings).start()
            stack.callback(handlers.stop)
            await wait_consumers(js, subjects.EVENTS_STREAM, ACCEPT, accept)
            await wait_consumers(js, subjects.EVENTS_STREAM, KINDS, handlers)
            await wait_consumers(js, subjects.EVENTS_STREAM, KEEPERS, keepers)
            jobs = Jobs()
            await nc.subscribe(subjects.job_status("*"), cb=jobs.on_msg)

            await _sequential(js, jobs, sizes.warmup)
            took, missed, _ = await _sequential(js, jobs, sizes.runs)
            rates, _ = await _burst(js, jobs, sizes.burst, first=min(sizes.pool, 100))
            warm = await _warm_half(state, js, jobs, tmp_path, sizes)
            accept.check()
            keepers.check()
            handlers.check()
    where = state_dir.parent if state_dir else Path(tempfile.gettempdir())  # (the data dir's)
    return {
        "state": f"{'a state dir in' if state_dir else 'the data dir, in'} {where} "
        f"(tmpfs: {_on_tmpfs(where)})",
        "latency": _latencies(took, missed),
        "rates": rates,
        "running_not_seen": missed,
        "warm": warm,
    }


def _on_tmpfs(path) -> bool:
    """Whether `path` is on a tmpfs (its longest mount point in /proc/mounts is one)."""
    best, kind = "", ""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, point, fstype = line.split()[:3]
            inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
            if inside and len(point) >= len(best):
                best, kind = point, fstype
    return kind == "tmpfs"


async def _warm_half(state, js, jobs: Jobs, workdir: Path, sizes: Sizes) -> dict:
    """The sequential runs and the burst again, from warm pools (same handlers, same run)."""
    seq = job_spec(workdir, WARM_APP, pool=sizes.seq_pool)
    await state.apps.put(seq.name, seq)
    await _pool_filled(state, seq.name, sizes.seq_pool)
    await _sequential(js, jobs, sizes.warmup, seq.name)
    took, missed, seq_ids = await _sequential(js, jobs, sizes.runs, seq.name)
    warm_only = [
        jobs.seen[j]["running"] - t0
        for j, t0 in seq_ids.items()
        if (jobs.last[j].get("phases") or {}).get("warm") and "running" in jobs.seen[j]
    ]
    burst = job_spec(workdir, BURST_APP, pool=min(sizes.pool, 100))
    await state.apps.put(burst.name, burst)
    fill_s = await _pool_filled(state, burst.name, burst.pool.size)
    rates, burst_ids = await _burst(js, jobs, sizes.burst, burst.name, first=burst.pool.size)
    return {
        "latency": [
            *_latencies(took, missed, " (warm pool)"),
            stats.latency("run request -> running (warm runs only)", warm_only),
        ],
        "rates": [{**r, "name": f"{r['name']} (warm pool)"} for r in rates],
        "running_not_seen": missed,
        "sequential_warm": f"{_warm_count(jobs, list(seq_ids))} of {len(seq_ids)}",
        "burst_warm": f"{_warm_count(jobs, burst_ids)} of {len(burst_ids)}",
        "pool": burst.pool.size,
        "pool_fill_s": fill_s,
    }


async def run(sizes: Sizes = FULL, celery: bool = True) -> dict:
    """Both halves in this one run; a half that cannot run is reported with its error."""
    result: dict = {"bench": "runs", "machine": stats.machine(), "sizes": asdict(sizes)}
    try:
        result["spinyard"] = await run_spinyard(sizes)
    except BenchError as exc:
        result["spinyard"] = {"error": str(exc)}
    try:
        result["raw_hops"] = {"latency": await chain_peer.measure(sizes.runs, sizes.warmup)}
    except BenchError as exc:
        result["raw_hops"] = {"error": str(exc)}
    if "error" not in result["spinyard"] and "error" not in result["raw_hops"]:
        result["floor"] = floor(result["spinyard"], result["raw_hops"])
    if celery:
        from bench import celery_peer  # imports celery, which the dev extra does not install

        csizes = celery_peer.Sizes(runs=sizes.runs, burst=sizes.burst, warmup=sizes.warmup)
        try:
            result["celery"] = await asyncio.to_thread(celery_peer.measure, csizes)
        except BenchError as exc:
            result["celery"] = {"error": str(exc)}
        if "error" not in result["spinyard"] and "error" not in result["celery"]:
            result["ratios"] = pairs(result["spinyard"], result["celery"])
    result["loadavg_1m_end"] = stats.machine()["loadavg_1m"]
    return result


def failed(result: dict) -> list[str]:
    """The errors of the halves that could not run."""
    parts = ("spinyard", "raw_hops", "celery")
    return [f"{p}: {result[p]['error']}" for p in parts if "error" in result.get(p, {})]


def main(quick: bool = False) -> dict:
    """Run and print both halves; `errors` in the result names a half that could not run."""
    result = asyncio.run(run(QUICK if quick else FULL))
    result["errors"] = failed(result)
    print(format_result(result), flush=True)
    return result
