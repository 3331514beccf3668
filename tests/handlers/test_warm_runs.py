"""Runs from warm runners, end to end: the handlers (run_start, pool_refill, the reaper),
the local backend's warm runners and moto's S3 server (harness of test_runs).

A job app with `pool.size` keeps warm runners; a run takes one (`phases.warm`)
and the pool refills; preloads are imported before the run; cancel and the
deadline work on a warm run; a dead runner is not used (the run starts cold);
an idle pool is reaped and fills again with the next run.
"""

import asyncio
import json
import os
import signal

import pytest
import structlog

from dispatcher.backends.local.backend import LocalBackend
from handlers import pools
from handlers.context import Context
from handlers.ports import Backend
from schemas import subjects
from schemas.codec import encode
from schemas.events import RunCancel
from tests.backends.local.procs import kill_left_processes
from tests.handlers.test_runs import OUTPUTS, model_spec, running
from tests.helpers import wait_for


@pytest.fixture(autouse=True)
def no_process_left(settings):
    """Fail a test that leaves a warm runner (or a run) running."""
    yield
    left = kill_left_processes(settings.data_dir)
    assert not left, f"the test left processes running: {left}"


@pytest.fixture
async def runs(settings, s3_server):
    async with running(settings, s3_server) as r:
        yield r


async def warm_members(runs, app: str, n: int) -> list[str]:
    """The pool's warm members once it has `n` whose runners are alive."""

    async def filled() -> list[str] | None:
        index = await runs.state.pools.get(app)
        alive = {i.id for i in await runs.backend.list_instances() if i.alive}
        warm = [m.instance for m in index.warm] if index else []
        return warm if len(warm) == n and set(warm) <= alive else None

    return await wait_for(filled, timeout=30, what=f"{n} warm runners of {app}")


async def test_a_run_takes_a_warm_runner_with_its_preloads_and_the_pool_refills(runs, tmp_path):
    spec = model_spec(name="demo/warm", pool={"size": 2}, preload=["colorsys", "xml.dom.minidom"])
    await runs.state.apps.put(spec.name, spec)
    before = await warm_members(runs, spec.name, 2)
    listed = {i.id: i for i in await runs.backend.list_instances()}
    assert {listed[m].kind for m in before} == {"warm"}

    inputs = {
        "outputs": OUTPUTS,
        "marker_dir": str(tmp_path),
        "see_modules": ["colorsys", "xml.dom.minidom", "wave"],
    }
    job = await runs.request(app=spec.name, inputs=inputs)
    done = await runs.wait_state(job, "succeeded")
    assert done["phases"]["warm"] is True
    assert sorted(r["name"] for r in done["results"]) == sorted(OUTPUTS)
    running_status = await runs.wait_state(job, "running")
    assert running_status["phases"]["warm"] is True
    # run_start reported it running; the backend's own report of it changed nothing
    assert runs.states(job) == ["queued", "running", "succeeded"]
    seen = json.loads((tmp_path / f"modules-{job}").read_text())
    assert seen == ["colorsys", "xml.dom.minidom"]  # imported before the run

    after = await warm_members(runs, spec.name, 2)
    assert len(set(before) - set(after)) == 1  # one used up, one new in its place
    assert (tmp_path / "runs").read_text().split() == [job]


class NoRunningReports(LocalBackend):
    """The local backend with the watcher's `running` reports dropped (its ends kept)."""

    async def watch_jobs(self, report, stopping):
        async def ends_only(update):
            if update.state != "running":
                await report(update)

        await super().watch_jobs(ends_only, stopping)


async def test_a_warm_run_is_running_as_soon_as_its_runner_started_it(settings, s3_server):
    async with running(settings, s3_server, backend_class=NoRunningReports) as runs:
        spec = model_spec(name="demo/warmfast", pool={"size": 1})
        await runs.state.apps.put(spec.name, spec)
        await warm_members(runs, spec.name, 1)
        job = await runs.request(app=spec.name, inputs={"outputs": OUTPUTS})
        done = await runs.wait_state(job, "succeeded")
        assert runs.states(job) == ["queued", "running", "succeeded"]
        phases = done["phases"]
        assert phases["warm"] is True
        assert phases["queued"] <= phases["started"] <= phases["running"] <= phases["finished"]
        cold = await runs.request(inputs={"outputs": OUTPUTS})  # no pool: the backend reports
        await runs.wait_state(cold, "succeeded")
        assert runs.states(cold) == ["queued", "succeeded"]


async def test_two_runs_at_once_on_a_pool_of_one_get_one_warm_start_and_each_runs_once(
    runs, tmp_path
):
    """The pool's one runner goes to one of the two starts; the other starts cold."""
    spec = model_spec(name="demo/warmrace", pool={"size": 1}, outputs=[])
    await runs.state.apps.put(spec.name, spec)
    await warm_members(runs, spec.name, 1)
    jobs = await asyncio.gather(
        *(runs.request(app=spec.name, inputs={"marker_dir": str(tmp_path)}) for _ in range(2))
    )
    done = [await runs.wait_state(job, "succeeded") for job in jobs]
    assert sorted(d["phases"]["warm"] for d in done) == [False, True]
    assert sorted((tmp_path / "runs").read_text().split()) == sorted(jobs)  # once each
    await warm_members(runs, spec.name, 1)  # and the pool fills again


async def test_runs_at_once_each_take_a_warm_runner_of_their_own(runs, tmp_path):
    """Starts that run at once (one handler's concurrency) claim distinct runners."""
    spec = model_spec(name="demo/warmmany", pool={"size": 4}, outputs=[])
    await runs.state.apps.put(spec.name, spec)
    await warm_members(runs, spec.name, 4)
    jobs = await asyncio.gather(
        *(runs.request(app=spec.name, inputs={"marker_dir": str(tmp_path)}) for _ in range(4))
    )
    done = [await runs.wait_state(job, "succeeded") for job in jobs]
    assert [d["phases"]["warm"] for d in done] == [True] * 4
    assert sorted((tmp_path / "runs").read_text().split()) == sorted(jobs)


async def test_a_cold_app_says_its_runs_were_not_warm(runs):
    job = await runs.request(inputs={"outputs": OUTPUTS})
    done = await runs.wait_state(job, "succeeded")
    assert done["phases"]["warm"] is False


async def test_cancel_and_the_deadline_stop_warm_runs(runs):
    slow = model_spec(name="demo/warmslow", pool={"size": 1}, outputs=[])
    late = model_spec(name="demo/warmlate", pool={"size": 1}, outputs=[], deadline_s=1)
    for spec in (slow, late):
        await runs.state.apps.put(spec.name, spec)
        await warm_members(runs, spec.name, 1)
    cancelled = await runs.request(app=slow.name, inputs={"mode": "sleep", "seconds": 60})
    assert (await runs.wait_state(cancelled, "running"))["phases"]["warm"] is True
    await runs.js.publish(
        subjects.event_for(subjects.RUN_CANCEL, cancelled), encode(RunCancel(job_id=cancelled))
    )
    await runs.wait_state(cancelled, "cancelled")
    timed_out = await runs.request(app=late.name, inputs={"mode": "sleep", "seconds": 60})
    failed = await runs.wait_state(timed_out, "timed_out", timeout=20)
    assert failed["phases"]["warm"] is True
    assert failed["error"]["code"] == "deadline_exceeded"

    async def none_running() -> bool:
        return not await runs.jobs_alive()

    await wait_for(none_running, what="both runs' processes gone")


async def test_a_warm_runner_killed_while_waiting_is_not_used(runs, tmp_path):
    spec = model_spec(name="demo/warmdead", pool={"size": 1}, outputs=[])
    await runs.state.apps.put(spec.name, spec)
    [member] = await warm_members(runs, spec.name, 1)
    listed = {i.id: i for i in await runs.backend.list_instances()}
    os.kill(int(listed[member].labels["pid"]), signal.SIGKILL)
    job = await runs.request(app=spec.name, inputs={"marker_dir": str(tmp_path)})
    done = await runs.wait_state(job, "succeeded")
    # Found dead by the claim (or dropped by a reaper pass first): the run started cold.
    # (A replacement takes a reaper pass and a runner's start, far longer than the request.)
    assert done["phases"]["warm"] is False
    [fresh] = await warm_members(runs, spec.name, 1)
    assert fresh != member
    assert member not in {i.id for i in await runs.backend.list_instances()}
    assert (tmp_path / "runs").read_text().split() == [job]


async def test_an_idle_pool_is_reaped_and_the_next_run_fills_it_again(runs):
    # Idle after 3 s without runs: longer than a runner's start on a loaded machine, or the
    # pool could be reaped before its member was ever seen warm.
    spec = model_spec(
        name="demo/warmidle", pool={"size": 1}, outputs=[], idle={"since_heartbeat_s": 3.0}
    )
    await runs.state.apps.put(spec.name, spec)
    [member] = await warm_members(runs, spec.name, 1)

    async def reaped() -> bool:
        index = await runs.state.pools.get(spec.name)
        listed = {i.id for i in await runs.backend.list_instances()}
        return index is not None and index.size() == 0 and member not in listed

    await wait_for(reaped, timeout=20, what="the idle pool emptied")
    job = await runs.request(app=spec.name)
    done = await runs.wait_state(job, "succeeded")
    assert done["phases"]["warm"] is False  # the pool was empty: a cold start
    await warm_members(runs, spec.name, 1)  # and it fills again


class ColdOnly(LocalBackend):
    """A backend that keeps no warm runners, as the Kubernetes backend does for now."""

    warm_runners = False
    start_warm = Backend.start_warm
    submit_warm = Backend.submit_warm


async def test_on_a_backend_without_warm_runners_a_pool_is_ignored_and_runs_start_cold(
    settings, s3_server
):
    async with running(settings, s3_server, backend_class=ColdOnly) as runs:
        spec = model_spec(name="demo/coldpool", pool={"size": 2}, outputs=[])
        await runs.state.apps.put(spec.name, spec)
        job = await runs.request(app=spec.name)
        done = await runs.wait_state(job, "succeeded")
        assert done["phases"]["warm"] is False
        await asyncio.sleep(1.0)  # five reaper passes: none may reserve a warm runner
        assert await runs.state.pools.get(spec.name) is None  # nothing was ever reserved
        kinds = {i.kind for i in await runs.backend.list_instances()}
        assert "warm" not in kinds


async def test_a_run_is_handed_no_warm_runner_of_another_revision(runs):
    """A run runs the revision it records: a runner of a newer one (started after a publish
    that a remembered spec has not caught up with) is not handed it, and stays warm."""
    spec = model_spec(name="demo/rev", pool={"size": 1}, revision=2)
    await runs.state.apps.put(spec.name, spec)
    [member] = await warm_members(runs, spec.name, 1)
    assert runs.state.pools.latest is not None  # run_start's process watches the pools
    ctx = Context(
        state=runs.state, backend=runs.backend, js=runs.js, log=structlog.get_logger("test")
    )
    assert await pools.claim(ctx, spec.name, revision=1, exact=True) is None
    assert [m.instance for m in (await runs.state.pools.get(spec.name)).warm] == [member]
    taken = await pools.claim(ctx, spec.name, revision=2, exact=True)
    assert taken is not None and taken.instance == member
    await runs.backend.stop_viz(member)


async def test_a_job_pool_emptied_by_runs_refills_back_to_back_without_the_reaper(
    settings, s3_server, tmp_path
):
    """Runs ask for one refill at a time; each refill that ends with the pool still short
    asks for the next, so the pool is full again with no reaper pass (none runs here),
    and not over-full."""
    kinds = ["run_request", "run_start", "job_update", "pool_refill"]
    async with running(settings, s3_server, handler_ids=kinds) as runs:
        spec = model_spec(name="demo/warmchain", pool={"size": 3}, outputs=[])
        await runs.state.apps.put(spec.name, spec)
        ctx = Context(
            state=runs.state, backend=runs.backend, js=runs.js, log=structlog.get_logger("test")
        )
        assert await pools.request_refill(ctx, spec, limit=3) == 3  # as a reaper pass would
        first = await warm_members(runs, spec.name, 3)

        jobs = await asyncio.gather(
            *(runs.request(app=spec.name, inputs={"marker_dir": str(tmp_path)}) for _ in range(3))
        )
        for job in jobs:
            done = await runs.wait_state(job, "succeeded")
            assert done["phases"]["warm"] is True

        again = await warm_members(runs, spec.name, 3)
        assert not set(first) & set(again)
        await asyncio.sleep(0.5)  # nothing more is asked for once it is full
        index = await runs.state.pools.get(spec.name)
        assert len(index.warm) == 3 and not index.starting
        alive = [i for i in await runs.backend.list_instances() if i.kind == "warm" and i.alive]
        assert len(alive) == 3
