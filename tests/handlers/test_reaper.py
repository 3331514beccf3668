"""A reaper pass against a real nats-server and the local backend, called directly so a test
can hand it the exact view of the world a race would give it."""

import time

import structlog
from structlog.testing import capture_logs

from dispatcher import bus
from dispatcher.backends.local.backend import LocalBackend
from handlers import activity
from handlers.context import Context, Knobs
from handlers.deployments import SHARED, Deployment, slot_key
from handlers.reaper_tick import reaper_tick
from schemas.events import ReaperTick
from schemas.spec import IdleLimits
from schemas.status import AppState
from tests.backends.contract import echo_spec


async def test_a_pass_does_not_stop_an_app_registered_after_it_listed_the_apps(
    settings, monkeypatch
):
    """The pass lists the apps first; an app registered after that, whose first page load
    made a deployment the pass then scans, is asked for again, not stopped as removed."""
    nc = await bus.connect(settings.nats, "test-reaper")
    state = await bus.ensure_state(nc.jetstream(), settings.nats)
    backend = LocalBackend(settings.backend.local, settings.data_dir, "http://127.0.0.1:9")
    await backend.setup()
    spec = echo_spec(name="demo/new")
    instance = "i-00000000000000a1"
    try:
        await backend.start_viz(instance, spec)
        await backend.wait_ready(instance, spec, 15)
        await state.apps.put(spec.name, spec)
        now = time.time()
        key = slot_key(spec.name, SHARED)
        record = Deployment(
            app=spec.name,
            slot=SHARED,
            instance=instance,
            state=AppState.READY,
            event_id="ev-1",
            created_at=now,
            last_page_load=now,
        )
        await state.deployments.create(key, record)

        async def listed_before_the_app_was_registered(pattern=">"):
            return []

        monkeypatch.setattr(state.apps, "scan", listed_before_the_app_was_registered)
        ctx = Context(
            state=state,
            backend=backend,
            js=nc.jetstream(),
            log=structlog.get_logger("test"),
            knobs=Knobs(reconcile_grace_s=0.0),
        )
        await reaper_tick(ctx, ReaperTick(id="tick-1"))

        kept = await state.deployments.get(key)
        assert kept is not None and kept.state == AppState.READY
        alive = [i.id for i in await backend.list_instances() if i.alive]
        assert alive == [instance]
    finally:
        await backend.stop_viz(instance)
        await backend.cleanup()
        await nc.close()


async def _idle_deployment(settings, name):
    """A ready deployment of `name` (echo app, running) whose record is 100 s old, with an
    idle limit of 10 s since the last heartbeat or page load."""
    nc = await bus.connect(settings.nats, "test-reaper")
    state = await bus.ensure(nc.jetstream(), settings.nats, [], settings.handlers)
    backend = LocalBackend(settings.backend.local, settings.data_dir, "http://127.0.0.1:9")
    await backend.setup()
    spec = echo_spec(name=name, idle=IdleLimits(since_heartbeat_s=10))
    instance = "i-00000000000000b1"
    await backend.start_viz(instance, spec)
    await backend.wait_ready(instance, spec, 15)
    await state.apps.put(spec.name, spec)
    then = time.time() - 100
    record = Deployment(
        app=spec.name,
        slot=SHARED,
        instance=instance,
        state=AppState.READY,
        event_id="ev-1",
        created_at=then,
        last_page_load=then,
    )
    key = slot_key(spec.name, SHARED)
    await state.deployments.create(key, record)
    ctx = Context(
        state=state,
        backend=backend,
        js=nc.jetstream(),
        log=structlog.get_logger("test"),
        knobs=Knobs(reconcile_grace_s=0.0),
    )
    return nc, backend, ctx, key, instance


async def test_a_heartbeat_after_the_pass_read_activity_calls_the_stop_off(settings, monkeypatch):
    """The pass read the activity keys before a heartbeat came in; once the record reads
    stopping, it reads them again, sees the heartbeat, and puts the record back."""
    nc, backend, ctx, key, instance = await _idle_deployment(settings, "demo/busy")
    try:
        await activity.record(ctx, key, activity.HEARTBEAT)

        async def read_before_the_heartbeat(ctx):
            return {}

        monkeypatch.setattr(activity, "scan", read_before_the_heartbeat)
        with capture_logs() as logged:
            await reaper_tick(ctx, ReaperTick(id="tick-1"))

        kept = await ctx.state.deployments.get(key)
        assert kept is not None and kept.state == AppState.READY
        assert [i.id for i in await backend.list_instances() if i.alive] == [instance]
        assert any(e["event"] == "viz_stop_called_off" for e in logged)
    finally:
        await backend.stop_viz(instance)
        await backend.cleanup()
        await nc.close()


async def test_without_activity_the_idle_deployment_is_stopped(settings):
    nc, backend, ctx, key, instance = await _idle_deployment(settings, "demo/quiet")
    try:
        await reaper_tick(ctx, ReaperTick(id="tick-1"))
        assert await ctx.state.deployments.get(key) is None
        assert [i.id for i in await backend.list_instances() if i.alive] == []
    finally:
        await backend.stop_viz(instance)
        await backend.cleanup()
        await nc.close()
