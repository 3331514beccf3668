"""KV state access: compare-and-set and full scans, on a real nats-server."""

import asyncio

import pytest

from dispatcher import bus
from handlers.state import Deployment, slot_key
from schemas.spec import AppSpec
from schemas.status import AppState


@pytest.fixture
async def state(settings):
    nc = await bus.connect(settings.nats, "test-state")
    yield await bus.ensure_state(nc.jetstream(), settings.nats)
    await nc.close()


def dep(instance="i-0000000000000001", **kw) -> Deployment:
    base = dict(
        app="demo/x",
        slot="shared",
        instance=instance,
        state=AppState.PENDING,
        event_id="ev-1",
        created_at=1.0,
        last_page_load=1.0,
    )
    return Deployment(**(base | kw))


async def test_scan_of_an_empty_bucket_is_empty(state):
    assert await state.scan(state.apps) == []
    assert await state.list_apps() == []


async def test_scan_sees_every_live_key_and_no_deleted_one(state):
    for i in range(60):
        await state.put_app(AppSpec(name=f"demo/app{i}", command=["x"]))
    await state.delete_app("demo/app7")
    await state.put_app(AppSpec(name="demo/app8", command=["y"]))  # overwritten: latest value
    # Many scans at once, while the loop is busy: each must see all 59 apps.
    results = await asyncio.gather(*(state.list_apps() for _ in range(20)))
    for apps in results:
        by_name = {a.name: a for a in apps}
        assert len(by_name) == 59 and "demo/app7" not in by_name
        assert by_name["demo/app8"].command == ["y"]


async def test_scan_with_a_pattern_that_matches_nothing(state):
    await state.put_app(AppSpec(name="demo/one", command=["x"]))
    assert await state.scan(state.apps, "other.>") == []
    assert [k for k, _, _ in await state.scan(state.apps, "demo.>")] == ["demo.one"]


async def test_create_wins_once_and_update_needs_the_current_revision(state):
    key = slot_key("demo/x", "shared")
    results = await asyncio.gather(
        *(state.create(state.deployments, key, dep(f"i-{i:016d}")) for i in range(10))
    )
    assert sum(r is not None for r in results) == 1
    entry = await state.read(state.deployments, key, Deployment)
    newer = entry.value.model_copy(update={"state": AppState.READY})
    assert await state.update(state.deployments, key, newer, entry.revision) is not None
    assert await state.update(state.deployments, key, newer, entry.revision) is None  # stale
    assert not await state.delete(state.deployments, key, entry.revision)  # stale
    assert await state.delete(state.deployments, key)
    assert await state.read(state.deployments, key, Deployment) is None
    # A deleted key can be created again.
    assert await state.create(state.deployments, key, dep()) is not None
