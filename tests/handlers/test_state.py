"""KV state access: compare-and-set and full scans, on a real nats-server."""

import asyncio

import msgpack
import pytest
import structlog.testing

from dispatcher import bus
from dispatcher.bus.watch import watch_keys
from handlers.deployments import Deployment, session_slot, slot_key
from handlers.memo import Latest
from handlers.pools import POOL_KEYS, PoolIndex, pool_key
from handlers.state import SCAN_TIMEOUT_S, Records
from schemas.spec import AppSpec
from schemas.status import AppState
from tests.helpers import wait_for


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
    assert await state.apps.scan() == []
    assert await state.jobs.scan() == []


async def test_scan_sees_every_live_key_and_no_deleted_one(state):
    for i in range(60):
        await state.apps.put(f"demo/app{i}", AppSpec(name=f"demo/app{i}", command=["x"]))
    await state.apps.delete("demo/app7")
    await state.apps.put("demo/app8", AppSpec(name="demo/app8", command=["y"]))  # latest value
    # Many scans at once, while the loop is busy: each must see all 59 apps.
    results = await asyncio.gather(*(state.apps.scan() for _ in range(20)))
    for apps in results:
        by_name = {a.key: a.value for a in apps}
        assert len(by_name) == 59 and "demo/app7" not in by_name
        assert by_name["demo/app8"].command == ["y"]


async def test_scan_with_a_pattern_that_matches_nothing(state):
    await state.apps.put("demo/one", AppSpec(name="demo/one", command=["x"]))
    started = asyncio.get_running_loop().time()
    assert await state.apps.scan("other.>") == []
    # Answered from the stream's subjects, not after waiting out the scan's timeout.
    assert asyncio.get_running_loop().time() - started < SCAN_TIMEOUT_S / 2
    assert [e.key for e in await state.apps.scan("demo.>")] == ["demo/one"]


async def test_create_wins_once_and_update_needs_the_current_revision(state):
    key = slot_key("demo/x", "shared")
    results = await asyncio.gather(
        *(state.deployments.create(key, dep(f"i-{i:016d}")) for i in range(10))
    )
    assert sum(r is not None for r in results) == 1
    entry = await state.deployments.read(key)
    newer = entry.value.model_copy(update={"state": AppState.READY})
    assert await state.deployments.update(key, newer, entry.revision) is not None
    assert await state.deployments.update(key, newer, entry.revision) is None  # stale
    assert not await state.deployments.delete(key, entry.revision)  # stale
    assert await state.deployments.delete(key)
    assert await state.deployments.read(key) is None
    # A deleted key can be created again.
    assert await state.deployments.create(key, dep()) is not None


async def test_records_are_typed_and_pools_share_the_deployments_bucket(state):
    """Each accessor reads its own model; a pool lives beside its app's deployments
    (`owner.title.pool`, the layout the gateway reads) and never shows up as one."""
    key = slot_key("demo/x", "shared")
    await state.deployments.put(key, dep())
    # A session named "pool" is a deployment, not the app's pool.
    per_session = slot_key("demo/x", session_slot("pool"))
    await state.deployments.put(per_session, dep(session="pool", slot=session_slot("pool")))
    pool = PoolIndex(starting={"i-0000000000000002": 1.0})
    assert await state.pools.create("demo/x", pool) is not None
    assert await state.pools.create("demo/x", pool) is None  # exists

    assert (await state.deployments.kv.get("demo.x.pool")).revision > 0
    assert await state.pools.get("demo/x") == pool
    assert isinstance(await state.deployments.get(key), Deployment)
    assert sorted(e.key for e in await state.deployments.scan()) == sorted([key, per_session])
    assert [(e.key, e.value) for e in await state.pools.scan()] == [("demo/x", pool)]


async def test_change_retries_on_conflict_and_creates_from_a_default(state):
    seen = []

    def add(index: PoolIndex) -> PoolIndex:
        seen.append(index.size())
        index.starting[f"i-{len(index.starting):016d}"] = 1.0
        return index

    assert await state.pools.change("demo/y", add) is None  # absent, no default: left alone
    entries = await asyncio.gather(
        *(state.pools.change("demo/y", add, default=PoolIndex) for _ in range(5))
    )
    assert sorted(e.value.size() for e in entries) == [1, 2, 3, 4, 5]  # none lost
    assert (await state.pools.get("demo/y")).size() == 5
    assert await state.pools.change("demo/y", lambda index: None) is None  # declined


async def test_change_starts_from_a_known_entry_and_rereads_if_it_is_stale(state):
    def add(index: PoolIndex) -> PoolIndex:
        index.starting[f"i-{len(index.starting):016d}"] = 1.0
        return index

    first = await state.pools.change("demo/k", add, default=PoolIndex)
    second = await state.pools.change("demo/k", add, known=first)  # still current: one write
    assert second.revision > first.revision and second.value.size() == 2
    third = await state.pools.change("demo/k", add, known=first)  # stale: read again
    assert third.value.size() == 3  # nothing written over
    assert (await state.pools.get("demo/k")).size() == 3


def add_one(index: PoolIndex) -> PoolIndex:
    index.starting[f"i-{len(index.starting):016d}"] = 1.0
    return index


async def test_changes_of_one_record_in_one_process_take_turns_without_conflicts(state):
    updates = []
    update = state.pools.update

    async def counted(id, value, revision):
        updates.append(await update(id, value, revision))
        return updates[-1]

    state.pools.update = counted
    await state.pools.change("demo/t", add_one, default=PoolIndex)
    entries = await asyncio.gather(*(state.pools.change("demo/t", add_one) for _ in range(20)))
    assert sorted(e.value.size() for e in entries) == list(range(2, 22))
    assert len(updates) == 20 and None not in updates  # one write each, none lost to a race
    assert len({id(e.value) for e in entries}) == 20  # each its own value, not one shared
    assert state.pools._turns == {}  # forgotten once nobody waits


async def test_a_change_declined_on_the_last_turns_write_is_decided_again_on_the_record(state):
    first = await state.pools.change("demo/g", add_one, default=PoolIndex)

    def add_past_four(index: PoolIndex) -> PoolIndex | None:
        return add_one(index) if index.size() >= 4 else None

    async with state.pools.turn("demo/g") as turn:
        state.pools.remember(turn, first.value, first.revision)  # as a change in turn would
        waiting = asyncio.create_task(state.pools.change("demo/g", add_past_four))
        await asyncio.sleep(0.05)  # it waits for the turn
        assert not waiting.done()
        other = await state.pools.read("demo/g")  # another replica writes meanwhile
        four = other.value.model_copy(update={"starting": {f"i-{n:016d}": 1.0 for n in range(4)}})
        assert await state.pools.update("demo/g", four, other.revision) is not None
    written = await waiting
    assert written is not None and written.value.size() == 5
    assert (await state.pools.get("demo/g")).size() == 5


async def test_a_record_this_version_cannot_read_is_skipped_not_fatal(state):
    """One bad spec (e.g. a job spec with `{port}`, valid before that was refused) must not
    stop the reaper's and the gateway's scans of every other app."""
    good = AppSpec(name="demo/good", command=["x"])
    await state.apps.put(good.name, good)
    bad = good.model_dump(mode="json") | {"name": "demo/bad", "kind": "job"}
    bad["command"] = ["{python}", "model.py", "--port={port}"]
    await state.apps.kv.put("demo.bad", msgpack.packb(bad))
    await state.apps.kv.put("demo.junk", b"\xc1 not msgpack")
    with structlog.testing.capture_logs() as logs:
        found = await state.apps.scan()
    assert [e.value.name for e in found] == ["demo/good"]
    assert sorted(e["key"] for e in logs if e["event"] == "record_unreadable") == [
        "demo.bad",
        "demo.junk",
    ]


async def test_a_change_starts_from_what_the_watch_saw_and_a_missed_write_costs_a_read(state):
    """With the pools' record watched, a change that another replica's write preceded is one
    write, no read; a write the watch did not pass on is found by the compare-and-set."""
    other = Records(state.pools.kv, PoolIndex, key=pool_key)  # another replica's view
    await other.change("demo/w", add_one, default=PoolIndex)
    state.pools.latest = Latest()
    watch = await watch_keys(state.pools.kv, POOL_KEYS, state.pools.heard)
    reads = []
    read = state.pools.read

    async def counted(id):
        reads.append(id)
        return await read(id)

    state.pools.read = counted
    try:
        await state.deployments.put(slot_key("demo/w", "shared"), dep())  # not a pool: ignored
        written = await other.change("demo/w", add_one)
        await wait_for(
            lambda: state.pools.latest.get(pool_key("demo/w")) is not None, what="the watch"
        )
        assert state.pools.latest.get(slot_key("demo/w", "shared")) is None
        mine = await state.pools.change("demo/w", add_one)
        assert mine.revision > written.revision and mine.value.size() == 3
        assert reads == []  # one write, on what the watch saw
        await watch.unsubscribe()
        watch = None
        missed = await other.change("demo/w", add_one)  # the watch is gone: unseen
        again = await state.pools.change("demo/w", add_one)
        assert again.revision > missed.revision and again.value.size() == 5
        assert reads == ["demo/w"]  # the stale guess lost, the record was read
    finally:
        state.pools.read = read
        if watch is not None:
            await watch.unsubscribe()
