"""run_request's spec, called directly on a real nats-server: read afresh, or taken from
the process's memory and checked by a read beside the create (one round trip, not two).

A run records the revision it runs, so a spec remembered a moment too long (a publish
the watch had not passed on yet) must not decide what the run records.
"""

import asyncio

import pytest
import structlog

from dispatcher import bus
from handlers.context import Context
from handlers.errors import Rejected
from handlers.memo import Memo
from handlers.run_request import run_request
from schemas import errors as codes
from schemas.events import RunRequest
from schemas.spec import AppSpec
from schemas.status import JobState
from tests.handlers.test_runs import model_spec

APP = "demo/req"


@pytest.fixture
async def ctx(settings):
    nc = await bus.connect(settings.nats, "test-run-request")
    js = nc.jetstream()
    state = await bus.ensure(js, settings.nats, [], settings.handlers)  # streams and buckets
    yield Context(
        state=state,
        backend=None,  # type: ignore[arg-type]  # run_request starts nothing
        js=js,
        log=structlog.get_logger("test"),
        memo=Memo(spec_ttl_s=60.0),  # no watch: what it remembers stays until forgotten
    )
    await nc.close()


def spec(revision: int, **fields) -> AppSpec:
    return model_spec(name=APP, revision=revision, **fields)


async def test_a_spec_read_now_is_remembered_for_the_next_request(ctx):
    await ctx.state.apps.put(APP, spec(1))
    event = RunRequest(app=APP, session="s-1", inputs={})
    await run_request(ctx, event)
    assert ctx.memo.remembered(APP) == spec(1)


async def test_a_remembered_spec_is_checked_by_a_read_beside_the_create(ctx):
    """The create goes out before the read has answered: they share one round trip."""
    await ctx.state.apps.put(APP, spec(1))
    ctx.memo.remember(APP, spec(1))
    created = asyncio.Event()
    create, get = ctx.state.jobs.create, ctx.state.apps.get

    async def marked_create(id, value):
        created.set()
        return await create(id, value)

    async def read_after_the_create(name):
        await asyncio.wait_for(created.wait(), 5)  # times out if the read came first, alone
        return await get(name)

    ctx.state.jobs.create, ctx.state.apps.get = marked_create, read_after_the_create
    event = RunRequest(app=APP, session="s-1", inputs={})
    await run_request(ctx, event)
    [job] = [j for j in await ctx.state.jobs.scan() if j.value.event_id == event.id]
    assert job.value.state == JobState.QUEUED and job.value.revision == 1


async def test_a_spec_published_since_it_was_remembered_decides_the_run(ctx):
    ctx.memo.remember(APP, spec(1, deadline_s=30))
    await ctx.state.apps.put(APP, spec(2, deadline_s=45))  # the watch has not said so
    event = RunRequest(app=APP, session="s-1", inputs={})
    await run_request(ctx, event)
    [job] = [j for j in await ctx.state.jobs.scan() if j.value.event_id == event.id]
    assert (job.value.revision, job.value.deadline_s) == (2, 45)
    assert ctx.memo.remembered(APP) is None  # forgotten: the next request reads it


async def test_a_spec_published_since_that_refuses_the_inputs_fails_the_run(ctx):
    ctx.memo.remember(APP, spec(1))
    await ctx.state.apps.put(APP, spec(2, max_input_bytes=16))
    event = RunRequest(app=APP, session="s-1", inputs={"text": "x" * 64})
    with pytest.raises(Rejected) as refused:
        await run_request(ctx, event)
    assert refused.value.code == codes.TOO_LARGE  # (the handler's on_failure fails the run)


async def test_a_removed_app_is_refused_though_remembered(ctx):
    ctx.memo.remember(APP, spec(1))
    with pytest.raises(Rejected) as refused:
        await run_request(ctx, RunRequest(app=APP, session="s-1", inputs={}))
    assert refused.value.code == codes.UNKNOWN_APP
