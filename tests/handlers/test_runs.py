"""Model runs end to end: handlers, the local backend running jobs, moto's S3 server.

queued -> running -> succeeded with fetchable results; failed with a log tail;
cancel; deadline; one job per idempotency key; one job when the handler dies
while starting it; S3 down while a run finishes.
"""

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys

import aiohttp
import msgpack
import pytest

from dispatcher import bus, compose
from dispatcher.backends.local.backend import LocalBackend
from dispatcher.embedded.s3server import S3Server
from dispatcher.runtime import Handlers
from dispatcher.store import ObjectStore
from handlers.registry import Registry, default_registry
from schemas import subjects
from schemas.codec import encode
from schemas.events import RunRequest, job_id_for
from schemas.spec import AppSpec
from tests.helpers import APPS, wait_for
from tests.s3 import store_settings

MODEL = str(APPS / "run_model.py")


def model_spec(name="demo/model", **overrides) -> AppSpec:
    base = dict(
        name=name,
        kind="job",
        command=["{python}", MODEL],
        deadline_s=30,
        outputs=["summary.json", "table.csv"],
    )
    return AppSpec(**(base | overrides))


OUTPUTS = {"summary.json": '{"ok": true}', "table.csv": "a,b\n1,2\n"}


class Runs:
    def __init__(self, js, state, backend, store):
        self.js, self.state, self.backend, self.store = js, state, backend, store
        self.seen: dict[str, list[dict]] = {}

    async def on_status(self, msg):
        status = msgpack.unpackb(msg.data)
        self.seen.setdefault(status["job_id"], []).append(status)

    async def request(self, app="demo/model", inputs=None, key=None, session="s-1") -> str:
        event = RunRequest(app=app, session=session, inputs=inputs or {}, idempotency_key=key)
        await self.js.publish(
            subjects.event(subjects.RUN_REQUEST, app),
            encode(event),
            headers={"Nats-Msg-Id": event.id},
        )
        return job_id_for(app, session, key, event.id)

    def states(self, job_id) -> list[str]:
        return [s["state"] for s in self.seen.get(job_id, [])]

    async def wait_state(self, job_id, state, timeout=30.0) -> dict:
        await wait_for(
            lambda: state in self.states(job_id),
            timeout=timeout,
            what=f"{job_id} -> {state} (saw {self.states(job_id)})",
        )
        return next(s for s in self.seen[job_id] if s["state"] == state)

    async def jobs_alive(self) -> list:
        return [i for i in await self.backend.list_instances() if i.kind == "job" and i.alive]


@contextlib.asynccontextmanager
async def running(settings, s3_endpoint, handler_ids=None, registry=None, backend_class=None):
    registry = registry or default_registry
    backend_class = backend_class or LocalBackend
    backend = backend_class(settings.backend.local, settings.data_dir, "http://127.0.0.1:9999")
    await backend.setup()
    settings.store = store_settings(s3_endpoint, upload_url_ttl_s=600)
    store = ObjectStore(settings.store)
    await store.setup()
    nc = await bus.connect(settings.nats, "test-runs")
    js = nc.jetstream()
    state = await bus.ensure_state(js, settings.nats)
    runs = Runs(js, state, backend, store)
    await nc.subscribe(f"{subjects.STATUS}.job.>", cb=runs.on_status)
    await compose.provision(js, settings, registry.select(handler_ids))
    service = Handlers(
        settings, handler_ids, nc=nc, state=state, backend=backend, store=store, registry=registry
    )
    task = asyncio.create_task(service.run(), name="handlers-under-test")
    await asyncio.wait_for(service.ready.wait(), 10)
    spec = model_spec()
    await state.apps.put(spec.name, spec)
    try:
        yield runs
    finally:
        service.stop()
        await task
        for instance in await backend.list_instances():
            if instance.kind == "job":
                await backend.cancel_job(instance.id)
            else:  # warm runners of pooled job apps
                await backend.stop_viz(instance.id)
        await backend.cleanup()
        await store.close()
        await nc.close()


@pytest.fixture
def s3():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
async def runs(settings, s3):
    async with running(settings, s3.endpoint) as r:
        yield r


async def test_run_succeeds_and_results_download_through_presigned_urls(runs):
    job = await runs.request(inputs={"outputs": OUTPUTS})
    done = await runs.wait_state(job, "succeeded")
    assert runs.states(job) == ["queued", "running", "succeeded"]
    assert done["exit_code"] == 0 and done["error"] is None
    phases = done["phases"]
    assert phases["queued"] <= phases["running"] <= phases["finished"]
    results = {r["name"]: r for r in done["results"]}
    assert set(results) == set(OUTPUTS)
    async with aiohttp.ClientSession() as http:
        for name, text in OUTPUTS.items():
            assert results[name]["key"] == f"results/{job}/{name}"
            async with http.get(results[name]["url"]) as r:
                assert r.status == 200 and await r.text() == text
    # How a page may show them: types from the file names, no chart declared.
    assert results["summary.json"]["type"] == "application/json"
    assert results["table.csv"]["type"] == "text/csv" and results["table.csv"]["chart"] is None


async def test_results_carry_the_types_and_charts_the_app_declares(runs):
    spec = model_spec(
        name="demo/charted",
        output_types={"summary.json": "application/vnd.demo+json"},
        charts={"table.csv": {"x": "a", "y": ["b"]}},
    )
    await runs.state.apps.put(spec.name, spec)
    job = await runs.request(app=spec.name, inputs={"outputs": OUTPUTS})
    done = await runs.wait_state(job, "succeeded")
    results = {r["name"]: r for r in done["results"]}
    assert results["summary.json"]["type"] == "application/vnd.demo+json"
    assert results["table.csv"]["chart"] == {"x": "a", "y": ["b"]}


async def test_failing_model_reports_exit_code_and_log_tail(runs):
    job = await runs.request(inputs={"mode": "fail", "outputs": OUTPUTS})
    failed = await runs.wait_state(job, "failed")
    assert failed["exit_code"] == 3
    assert "the answer was not 42" in failed["log_tail"]
    assert failed["error"]["code"] == "job_failed"


async def test_missing_outputs_fail_the_run(runs):
    job = await runs.request(inputs={"outputs": {"summary.json": "{}"}})
    failed = await runs.wait_state(job, "failed")
    assert failed["error"]["code"] == "bad_results"
    assert "table.csv" in failed["error"]["message"]


async def test_cancel_stops_a_running_job(runs, tmp_path):
    job = await runs.request(inputs={"mode": "sleep", "seconds": 60})
    await runs.wait_state(job, "running")
    await runs.js.publish(
        subjects.event_for(subjects.RUN_CANCEL, job),
        encode(__import__("schemas.events", fromlist=["RunCancel"]).RunCancel(job_id=job)),
    )
    await runs.wait_state(job, "cancelled")
    await wait_for(lambda: _none_alive(runs), what="job process gone")
    await asyncio.sleep(0.3)  # a late backend report must not move a finished run
    assert runs.states(job)[-1] == "cancelled"


async def _none_alive(runs):
    return not await runs.jobs_alive()


async def test_deadline_stops_the_run_as_timed_out(runs):
    await runs.state.apps.put("demo/slow", model_spec(name="demo/slow", deadline_s=1))
    job = await runs.request(app="demo/slow", inputs={"mode": "sleep", "seconds": 60})
    timed_out = await runs.wait_state(job, "timed_out", timeout=20)
    assert timed_out["error"]["code"] == "deadline_exceeded"
    await wait_for(lambda: _none_alive(runs), what="job process gone")


async def test_repeated_idempotency_key_runs_once(runs, tmp_path):
    inputs = {"outputs": OUTPUTS, "marker_dir": str(tmp_path)}
    first = await runs.request(inputs=inputs, key="form-1")
    second = await runs.request(inputs=inputs, key="form-1")
    assert first == second
    await runs.wait_state(first, "succeeded")
    await asyncio.sleep(0.5)  # room for a second run to show up, if one were started
    assert (tmp_path / "runs").read_text().split() == [first]


async def test_oversize_inputs_fail_with_too_large(runs):
    await runs.state.apps.put("demo/tiny", model_spec(name="demo/tiny", max_input_bytes=64))
    job = await runs.request(app="demo/tiny", inputs={"blob": "x" * 500})
    failed = await runs.wait_state(job, "failed")
    assert failed["error"]["code"] == "too_large"


async def test_job_gets_only_its_own_upload_urls(runs, tmp_path):
    """The hand-over holds one PUT URL per declared output, each for its own key."""
    job_id = "j-" + "a" * 20
    urls = runs.store.upload_urls(job_id, ["summary.json", "table.csv"])
    assert set(urls) == {"summary.json", "table.csv"}
    for name, url in urls.items():
        assert f"/results/{job_id}/{name}?" in url and "X-Amz-Signature=" in url


async def test_s3_down_while_a_run_finishes_then_back_still_succeeds(runs, s3, tmp_path):
    go = tmp_path / "go"
    job = await runs.request(inputs={"mode": "wait_for", "wait_for": str(go), "outputs": OUTPUTS})
    await runs.wait_state(job, "running")
    await wait_for(lambda: _uploaded(runs, job), what="outputs uploaded")
    port = s3.port
    s3.stop()
    go.touch()  # the model exits 0 while the store is down
    await asyncio.sleep(2.0)  # job_update has tried and failed at least once
    assert runs.states(job) == ["queued", "running"]
    back = S3Server(port=port).start()
    try:
        done = await runs.wait_state(job, "succeeded", timeout=30)
    finally:
        back.stop()
    assert {r["name"] for r in done["results"]} == set(OUTPUTS)


# The 45 s outage, scaled down: longer than job_update's tries would last with
# the backoff below (0.2 + 0.4 + 0.8 s), and past the run's deadline (2 s, plus the
# reaper's 0.5 s grace). The deadline leaves the model time to start and upload on a busy
# machine: at 1 s a loaded run could be stopped before the outage began.
OUTAGE_S = 5.0


def _impatient_job_update() -> Registry:
    """The handlers, with job_update's tries and backoff shortened to a test's scale."""
    registry = Registry()
    for spec in default_registry.select(None):
        if spec.id == "job_update":
            spec = dataclasses.replace(spec, retries=2, backoff_s=(0.2, 0.4, 0.8))
        registry.add(spec)
    return registry


async def test_store_down_past_the_tries_and_the_deadline_still_succeeds(settings, s3, tmp_path):
    """The store goes away right after a run's uploads, for longer than job_update's tries
    and past the run's deadline: the run still ends `succeeded` once the store is back."""
    registry = _impatient_job_update()
    spec = registry.get("job_update")
    assert OUTAGE_S > sum(spec.backoff(n) for n in range(1, spec.tries))
    async with running(settings, s3.endpoint, registry=registry) as runs:
        await runs.state.apps.put("demo/quick", model_spec(name="demo/quick", deadline_s=2))
        go = tmp_path / "go"
        inputs = {"mode": "wait_for", "wait_for": str(go), "outputs": OUTPUTS}
        job = await runs.request(app="demo/quick", inputs=inputs)
        await runs.wait_state(job, "running")
        await wait_for(lambda: _uploaded(runs, job), what="outputs uploaded")
        port = s3.port
        s3.stop()
        go.touch()  # the model exits 0 while the store is down
        record = await wait_for(lambda: _exited(runs, job), what="the exit noted")
        await asyncio.sleep(OUTAGE_S)
        assert runs.states(job) == ["queued", "running"]
        assert (await runs.state.jobs.get(job)).exited_at == record.exited_at
        back = S3Server(port=port).start()
        try:
            done = await runs.wait_state(job, "succeeded", timeout=30)
        finally:
            back.stop()
        assert {r["name"] for r in done["results"]} == set(OUTPUTS)
        info = await runs.js.stream_info(subjects.DEAD_STREAM)
        assert info.state.messages == 0  # nothing given up on the way


async def test_store_away_for_all_of_the_retention_fails_the_run(settings, s3, tmp_path):
    async with running(settings, s3.endpoint, registry=_impatient_job_update()) as runs:
        await runs.state.apps.put("demo/brief", model_spec(name="demo/brief", retention_s=1))
        go = tmp_path / "go"
        inputs = {"mode": "wait_for", "wait_for": str(go), "outputs": OUTPUTS}
        job = await runs.request(app="demo/brief", inputs=inputs)
        await runs.wait_state(job, "running")
        await wait_for(lambda: _uploaded(runs, job), what="outputs uploaded")
        s3.stop()
        go.touch()
        failed = await runs.wait_state(job, "failed", timeout=30)
        assert failed["error"]["code"] == "unavailable"
        assert "storage was unavailable" in failed["error"]["message"]


async def _exited(runs, job):
    record = await runs.state.jobs.get(job)
    return record if record is not None and record.exited_at is not None else None


async def _uploaded(runs, job):
    try:
        await runs.store.get_bytes(f"results/{job}/table.csv")
    except KeyError:
        return False
    return True


async def test_handler_killed_while_starting_a_job_runs_it_once(settings, s3, tmp_path):
    """The process running run_request and run_start is frozen right after `queued`, a
    second one takes over the redelivered events, then the first is killed: one run."""
    async with running(settings, s3.endpoint, ["job_update", "run_cancel"]) as runs:
        env = os.environ | {
            "SPINYARD_NATS__URL": settings.nats.url,
            "SPINYARD_DATA_DIR": str(settings.data_dir),
            "SPINYARD_HANDLERS__ACK_WAIT_S": "1.0",
            "SPINYARD_GATEWAY__PUBLIC_URL": "http://127.0.0.1:9999",
            "SPINYARD_STORE__ENDPOINT": s3.endpoint,
            "SPINYARD_STORE__ACCESS_KEY": "spinyard-test",
            "SPINYARD_STORE__SECRET_KEY": "spinyard-test-secret",
            "SPINYARD_STORE__BUCKET": settings.store.bucket,
            "SPINYARD_LOG_LEVEL": "warning",
        }
        argv = [sys.executable, "-m", "dispatcher.cli", "handlers", "run_request", "run_start"]
        first = subprocess.Popen(argv, env=env)
        second = None
        try:
            await wait_for(lambda: _bound(runs.js, "run_request"), what="first handler up")
            job = await runs.request(inputs={"outputs": OUTPUTS, "marker_dir": str(tmp_path)})
            await runs.wait_state(job, "queued")
            first.send_signal(signal.SIGSTOP)
            second = subprocess.Popen(argv, env=env)
            await runs.wait_state(job, "succeeded")
            first.send_signal(signal.SIGKILL)
            first.wait(5)
            await asyncio.sleep(0.5)
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGCONT)
                    proc.terminate()
                    proc.wait(15)
        assert (tmp_path / "runs").read_text().split() == [job]


async def _bound(js, durable):
    from nats.js.errors import NotFoundError

    try:
        return (await js.consumer_info(subjects.EVENTS_STREAM, durable)).num_waiting > 0
    except NotFoundError:
        return False
