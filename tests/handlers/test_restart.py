"""Restarts on the same data dir: records whose instance died are never served.

As `spinyard up` stopped and started again leaves them: the KV still lists
ready deployments and warm pool members, their app processes are gone. Real
nats-server, real app processes; the stack is test_viz_lifecycle's.
"""

import os
import signal
import time

import aiohttp
import structlog

from dispatcher.backends.local.backend import LocalBackend
from handlers import pools
from handlers.context import Context
from handlers.deployments import SHARED, session_slot
from handlers.pools import PoolIndex, PoolMember
from schemas import subjects
from schemas.spec import Pool
from tests.handlers.test_viz_lifecycle import hello_spec, running_stack
from tests.helpers import wait_for

CLASS = "demo/classroom"  # per_session, pool of 2
HALL = "demo/hall"  # shared, pool of 1
NO_REAPER = ["page_load", "heartbeat", "pool_refill"]


async def warm(stack, app: str) -> list[str]:
    index = await stack.state.pools.get(app)
    return [m.instance for m in index.warm] if index else []


async def kill(backend: LocalBackend, ids: set[str] | None = None) -> set[str]:
    """SIGKILL the processes of viz instances (all, or `ids`), as a dying `up` takes them."""
    killed = set()
    for instance in await backend.list_instances():
        if instance.kind == "viz" and instance.alive and (ids is None or instance.id in ids):
            os.kill(int(instance.labels["pid"]), signal.SIGKILL)
            killed.add(instance.id)

    async def all_dead() -> bool:
        listed = {i.id: i for i in await backend.list_instances()}
        return all(not listed[i].alive for i in killed if i in listed)

    await wait_for(all_dead, what="the killed instances seen dead")
    return killed


async def answers(stack, status: dict) -> bool:
    """Whether the instance of a `ready` status serves its page."""
    target = await stack.backend.target(status["instance"])
    if target is None:
        return False
    prefix = f"/apps/{status['app']}/{status['instance']}/"
    async with aiohttp.ClientSession() as http, http.get(target[1] + prefix) as resp:
        return resp.status == 200


async def test_after_a_restart_page_loads_of_pooled_apps_are_served_and_none_fail(settings):
    async with running_stack(settings, leave_running=True) as first:
        await first.register(hello_spec(name=CLASS, sharing="per_session", pool=Pool(size=2)))
        await first.register(hello_spec(name=HALL, pool=Pool(size=1)))
        await first.page_load(CLASS, session="before")
        await first.page_load(HALL)
        await first.wait_state(subjects.app_status(CLASS, "before"), "ready", timeout=30)
        await first.wait_state(subjects.app_status(HALL), "ready", timeout=30)

        async def pools_full() -> bool:
            return len(await warm(first, CLASS)) == 2 and len(await warm(first, HALL)) == 1

        await wait_for(pools_full, timeout=30, what="both pools full again")
    died = await kill(first.backend)
    assert len(died) == 5  # 2 served, 3 warm

    # Without the reaper: what the restarted page_load handler does on its own.
    async with running_stack(settings, NO_REAPER) as second:
        # Reconciled before its first page load: nothing dead is listed as ready or warm.
        assert await warm(second, CLASS) == [] and await warm(second, HALL) == []
        for app, slot in ((CLASS, session_slot("before")), (HALL, SHARED)):
            record = await second.record(app, slot)
            assert record.state == "failed" and record.error.code == "instance_lost"

        asked = time.time()
        sessions = ["before", "s-1", "s-2", "s-3"]
        for session in sessions:
            await second.page_load(CLASS, session=session)
        await second.page_load(HALL, session="s-1")
        subjects_loaded = [subjects.app_status(CLASS, s) for s in sessions]
        subjects_loaded.append(subjects.app_status(HALL))
        for subject in subjects_loaded:
            ready = await second.wait_state(subject, "ready", timeout=30)
            assert ready["instance"] not in died
            assert await answers(second, ready)
            since = [s for s in second.statuses.by_subject[subject] if s["time"] >= asked]
            assert "failed" not in [s["state"] for s in since], since


async def test_a_claim_skips_a_dead_pool_member_and_takes_the_next(settings):
    """The claim itself checks the instance: no reaper pass or restart has run yet."""
    async with running_stack(settings, NO_REAPER) as stack:
        spec = hello_spec(name=CLASS, sharing="per_session", pool=Pool(size=2))
        await stack.register(spec)
        members = []
        for instance in ("i-00000000000000d1", "i-00000000000000d2"):
            await stack.backend.start_viz(instance, spec, pooled=True)
            await stack.backend.wait_ready(instance, spec, 15)
            url = stack.backend.url(instance, spec)
            members.append(PoolMember(instance=instance, url=url, created_at=1.0, ready_at=2.0))
        await stack.state.pools.put(CLASS, PoolIndex(warm=members))
        await kill(stack.backend, {"i-00000000000000d1"})

        ctx = Context(
            state=stack.state,
            backend=stack.backend,
            js=stack.js,
            log=structlog.get_logger("test"),
        )
        claimed = await pools.claim(ctx, CLASS)
        assert claimed.instance == "i-00000000000000d2"
        assert await warm(stack, CLASS) == []
        listed = {i.id for i in await stack.backend.list_instances()}
        assert "i-00000000000000d1" not in listed  # stopped and forgotten
        assert await pools.claim(ctx, CLASS) is None  # nothing warm is left


async def test_the_reaper_drops_dead_pool_members_and_refills(settings):
    async with running_stack(settings) as stack:
        await stack.register(hello_spec(name=CLASS, sharing="per_session", pool=Pool(size=2)))

        async def full() -> list[str] | None:
            members = await warm(stack, CLASS)
            return members if len(members) == 2 else None

        before = await wait_for(full, timeout=30, what="a pool of 2")
        died = await kill(stack.backend, {before[0]})

        async def replaced() -> bool:
            members = await warm(stack, CLASS)
            if len(members) != 2 or died & set(members):
                return False
            alive = {i.id for i in await stack.backend.list_instances() if i.alive}
            return set(members) <= alive

        await wait_for(replaced, timeout=30, what="the dead member replaced")
        await stack.page_load(CLASS, session="after")
        ready = await stack.wait_state(subjects.app_status(CLASS, "after"), "ready")
        assert ready["phases"]["warm"] is True and await answers(stack, ready)
