"""Scheduled warm pools against a real nats-server and the local backend, with the handlers'
clock moved (`Handlers(now=...)`, `Context.now`) so a lecture's window opens and closes
within seconds."""

import asyncio
import contextlib
import time
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import structlog

from dispatcher import bus, compose
from dispatcher.backends.local.backend import LocalBackend
from dispatcher.runtime import Handlers
from handlers import pools
from handlers.context import Context, Knobs
from handlers.pools import PoolIndex, PoolMember
from handlers.reaper_tick import reaper_tick
from handlers.registry import default_registry
from schemas.events import ReaperTick
from schemas.schedule import DAYS, Window
from schemas.spec import AppSpec, Pool
from tests.backends.contract import echo_spec
from tests.helpers import wait_for

BERLIN = ZoneInfo("Europe/Berlin")
APP = "course/lecture"


class Clock:
    """The real time, moved by an offset: the handlers' clock in these tests."""

    def __init__(self, at: float):
        self.set(at)

    def set(self, at: float) -> None:
        self.offset = at - time.time()

    def __call__(self) -> float:
        return time.time() + self.offset


def lecture_day() -> tuple[datetime, str]:
    """09:50 in Berlin, two days ago, and that day's name. In the past, so the moved clock
    never makes a just-started instance look old (the reaper's orphan check uses the
    backend's real start times)."""
    day = datetime.now(BERLIN).date() - timedelta(days=2)
    return datetime(day.year, day.month, day.day, 9, 50, tzinfo=BERLIN), DAYS[day.weekday()]


def window(day: str, pool: int) -> Window:
    """A lecture's window: 09:50 to 11:00 in Berlin on `day`."""
    return Window.model_validate(
        {"days": [day], "from": "09:50", "to": "11:00", "tz": "Europe/Berlin", "pool": pool}
    )


def lecture(day: str, base: int, during: int) -> AppSpec:
    return echo_spec(
        name=APP, sharing="per_session", pool=Pool(size=base), schedule=[window(day, during)]
    )


@contextlib.asynccontextmanager
async def handlers_running(settings, clock: Clock):
    """The reaper and pool refills over the local backend, on `clock`; every instance is
    stopped on exit."""
    ids = ["reaper_tick", "pool_refill"]
    backend = LocalBackend(settings.backend.local, settings.data_dir, "http://127.0.0.1:9999")
    await backend.setup()
    nc = await bus.connect(settings.nats, "test-schedule")
    state = await compose.provision(nc.jetstream(), settings, default_registry.select(ids))
    service = Handlers(settings, ids, nc=nc, state=state, backend=backend, now=clock)
    task = asyncio.create_task(service.run(), name="handlers-under-test")
    try:
        await asyncio.wait_for(service.ready.wait(), 10)
        yield state, backend
    finally:
        service.stop()
        await task
        for instance in await backend.list_instances():
            await backend.stop_viz(instance.id)
        await backend.cleanup()
        await nc.close()


async def test_a_window_opening_fills_the_pool_and_its_end_shrinks_it(settings):
    """pool.size 1, a lecture window of 3: 1 before it, 3 once it opens (one start per
    reaper pass), 1 again once it ends, the oldest member kept."""
    settings.reaper.pool_refill_per_tick = 1
    open_at, day = lecture_day()
    clock = Clock(open_at.timestamp() - 2.0)
    spec = lecture(day, base=1, during=3)

    async def index() -> PoolIndex:
        return await state.pools.get(APP) or PoolIndex()

    async def pooled_alive() -> set[str]:
        return {i.id for i in await backend.list_instances() if i.pooled and i.alive}

    async with handlers_running(settings, clock) as (state, backend):
        await state.apps.put(APP, spec)
        seen_before = 0
        while clock() < open_at.timestamp() - 0.3:  # passes before the window: pool.size
            seen_before = max(seen_before, (await index()).size())
            await asyncio.sleep(0.05)
        assert seen_before <= 1

        async def three_warm():
            warm = (await index()).warm
            return warm if len(warm) == 3 and len(await pooled_alive()) == 3 else None

        warm = await wait_for(three_warm, timeout=30, what="the window's pool of 3 warm")
        # Staggered: each member was reserved by a pass of its own.
        assert len({m.created_at for m in warm}) == 3
        oldest = min(warm, key=lambda m: m.created_at).instance

        clock.set(open_at.replace(hour=10, minute=59, second=59).timestamp())

        async def one_left():
            now = await index()
            alive = await pooled_alive()
            return alive if len(now.warm) == 1 and not now.starting and len(alive) == 1 else None

        kept = await wait_for(one_left, timeout=15, what="the pool back to pool.size")
        assert clock() >= open_at.replace(hour=11, minute=0).timestamp()
        assert kept == {oldest} and (await index()).warm[0].instance == oldest


async def _direct(settings):
    """A reaper's context on a moved clock, called directly; refill events go unhandled."""
    nc = await bus.connect(settings.nats, "test-schedule")
    state = await bus.ensure(nc.jetstream(), settings.nats, [], settings.handlers)
    backend = LocalBackend(settings.backend.local, settings.data_dir, "http://127.0.0.1:9")
    await backend.setup()
    return nc, backend, state


async def test_refills_are_bounded_per_pass_and_a_closing_window_drops_the_newest_first(
    settings,
):
    """With 2 refills per pass, a window of 5 is reserved 2, 4, 5 over three passes; when it
    closes, reservations past pool.size are dropped, the newest first."""
    open_at, day = lecture_day()
    clock = Clock(open_at.timestamp())
    spec = lecture(day, base=1, during=5)
    nc, backend, state = await _direct(settings)
    ctx = Context(
        state=state,
        backend=backend,
        js=nc.jetstream(),
        log=structlog.get_logger("test"),
        knobs=Knobs(pool_refill_per_tick=2, reconcile_grace_s=86400.0),  # nothing expires
        now=clock,
    )
    try:
        await state.apps.put(APP, spec)
        sizes = []
        for n in range(4):
            await reaper_tick(ctx, ReaperTick(id=f"tick-{n}"))
            sizes.append((await state.pools.get(APP)).size())
        assert sizes == [2, 4, 5, 5]
        reserved = (await state.pools.get(APP)).starting
        oldest = min(reserved, key=reserved.__getitem__)

        clock.set(open_at.replace(hour=11).timestamp())
        await reaper_tick(ctx, ReaperTick(id="tick-closed"))
        assert list((await state.pools.get(APP)).starting) == [oldest]
    finally:
        await backend.cleanup()
        await nc.close()


def test_surplus_takes_reservations_then_the_newest_warm_members():
    index = PoolIndex(
        warm=[PoolMember(instance=f"w{n}", url="", created_at=n, ready_at=n) for n in range(3)],
        starting={"s-old": 10.0, "s-new": 20.0},
    )
    assert pools.surplus(index, 5, gone=set()) == set()
    assert pools.surplus(index, 4, gone=set()) == {"s-new"}
    assert pools.surplus(index, 2, gone=set()) == {"s-new", "s-old", "w2"}
    assert pools.surplus(index, 2, gone={"s-new"}) == {"s-old", "w2"}
    assert pools.surplus(index, 0, gone={"w0"}) == {"s-new", "s-old", "w1", "w2"}


async def test_a_job_pool_holds_its_window_however_long_no_run_came(settings):
    """A job app's pool is emptied after `idle.since_heartbeat_s` without runs, except in a
    window: the schedule says runs are coming."""
    open_at, day = lecture_day()
    spec = AppSpec(
        name="course/fit",
        kind="job",
        command=["{python}", "-c", "pass"],
        pool=Pool(size=2),
        schedule=[window(day, 6)],
    )
    backend = LocalBackend(settings.backend.local, settings.data_dir, "http://127.0.0.1:9")
    ctx = Context(state=None, backend=backend, js=None, log=structlog.get_logger("test"))
    during, before = open_at.timestamp() + 60, open_at.timestamp() - 60
    used_long_ago = PoolIndex(used_at=before - 2 * spec.idle.since_heartbeat_s)
    assert pools.target_size(ctx, spec, used_long_ago, before) == 0
    assert pools.target_size(ctx, spec, used_long_ago, during) == 6
    assert pools.target_size(ctx, spec, PoolIndex(used_at=before - 1), before) == 2
    assert pools.keeps_pool(spec.model_copy(update={"pool": Pool(size=0)}))
    no_pool = spec.model_copy(update={"pool": Pool(size=0), "schedule": []})
    assert not pools.keeps_pool(no_pool)


async def test_a_member_claimed_while_the_pass_drops_the_surplus_keeps_serving(
    settings, monkeypatch
):
    """The pass read the pool with two warm members just as the window closed; a page load
    claims one before the pass drops the surplus: that one is the viewer's and runs on."""
    open_at, day = lecture_day()
    spec = lecture(day, base=0, during=2)
    nc, backend, state = await _direct(settings)
    ctx = Context(
        state=state,
        backend=backend,
        js=nc.jetstream(),
        log=structlog.get_logger("test"),
        knobs=Knobs(reconcile_grace_s=86400.0),
        now=Clock(open_at.replace(hour=11).timestamp()),
    )
    members = ["i-00000000000000c1", "i-00000000000000c2"]
    try:
        await state.apps.put(APP, spec)
        for n, instance in enumerate(members):
            await backend.start_viz(instance, spec, pooled=True)
            await backend.wait_ready(instance, spec, 15)
            member = PoolMember(instance=instance, url="", created_at=n, ready_at=n)
            await pools.change(ctx, APP, lambda index, m=member: index.warm.append(m))
        read_before_the_claim = await state.pools.scan()
        monkeypatch.setattr(state.pools, "scan", lambda: _value(read_before_the_claim))
        claimed = await pools.claim(ctx, APP)
        assert claimed is not None and claimed.instance == members[0]

        await reaper_tick(ctx, ReaperTick(id="tick-closed"))

        alive = {i.id for i in await backend.list_instances() if i.alive}
        assert alive == {members[0]}
        assert (await state.pools.get(APP)).size() == 0
    finally:
        for instance in members:
            await backend.stop_viz(instance)
        await backend.cleanup()
        await nc.close()


async def _value(value):
    return value
