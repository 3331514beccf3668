"""Activity under a crowd: heartbeats and page loads of many viewers on one shared app.

Real nats-server, real app processes (see test_viz_lifecycle's stack).
"""

import asyncio
import time

from schemas import subjects
from schemas.spec import IdleLimits
from tests.handlers.test_viz_lifecycle import hello_spec, running_stack
from tests.helpers import wait_for

VIEWERS = 200
ROUNDS = 3


async def test_heartbeats_of_200_viewers_on_one_shared_app_are_never_retried(settings):
    """Also run on a three-node R3 cluster, by tests/bus/test_cluster.py."""
    async with running_stack(settings, ["page_load", "heartbeat"]) as stack:
        await crowd_heartbeats(stack)


async def crowd_heartbeats(stack) -> None:
    """200 viewers x 3 rounds of heartbeats on one ready shared app: all `ok` at once."""
    await stack.register(hello_spec())
    await stack.page_load("demo/hello")
    await stack.wait_state(subjects.app_status("demo/hello"), "ready")
    for _ in range(ROUNDS):
        await asyncio.gather(
            *(stack.heartbeat("demo/hello", session=f"v-{i}") for i in range(VIEWERS))
        )
    total = VIEWERS * ROUNDS

    def settled():
        final = ("ok", "failed", "dead_lettered")  # a retried message comes back
        return sum(stack.handled("heartbeat", o) for o in final) >= total

    await wait_for(settled, timeout=60, what=f"{total} heartbeats handled")
    counts = {o: stack.handled("heartbeat", o) for o in ("ok", "retried", "dead_lettered")}
    print(f"heartbeats of {VIEWERS} viewers x {ROUNDS}: {counts}")
    assert counts == {"ok": total, "retried": 0, "dead_lettered": 0}
    dead = await stack.js.stream_info(subjects.DEAD_STREAM)
    assert dead.state.messages == 0


async def _keys(stack) -> set[str]:
    return {e.key for e in await stack.state.activity.scan()}


async def test_later_page_loads_are_activity_and_their_keys_go_with_the_deployment(settings):
    idle = IdleLimits(
        since_heartbeat_s=1.5, since_page_load_s=3600, max_lifetime_s=3600, input_window_s=60
    )
    async with running_stack(settings) as stack:
        await stack.register(hello_spec(idle=idle))
        subject = subjects.app_status("demo/hello")
        await stack.page_load("demo/hello")
        await stack.wait_state(subject, "ready")
        # Other viewers load the page for twice the idle limit: no heartbeat, still there.
        deadline = time.monotonic() + 3.0
        i = 0
        while time.monotonic() < deadline:
            i += 1
            await stack.page_load("demo/hello", session=f"v-{i}")
            await asyncio.sleep(0.3)
        assert stack.statuses.last(subject)["state"] == "ready"
        assert await _keys(stack) == {"demo.hello.shared.page_load"}
        # Then nobody: reaped, and its activity key deleted after the grace.
        stopped = await stack.wait_state(subject, "stopped", timeout=10)
        assert stopped["reason"] == "idle_heartbeat"
        await wait_for(lambda: _no_keys(stack), what="activity keys deleted")


async def _no_keys(stack) -> bool:
    return await _keys(stack) == set()


async def test_per_session_heartbeats_write_their_own_slots_key(settings):
    async with running_stack(settings, ["page_load", "heartbeat"]) as stack:
        await stack.register(hello_spec(name="demo/class", sharing="per_session"))
        await stack.page_load("demo/class", session="alice")
        await stack.wait_state(subjects.app_status("demo/class", "alice"), "ready")
        before = time.time()
        await stack.heartbeat("demo/class", session="alice")
        await stack.heartbeat("demo/class", session="bob", visible=False)  # not counted

        async def written():
            return await stack.state.activity.get("demo.class.session.alice.heartbeat")

        mark = await wait_for(written, what="alice's heartbeat key")
        assert mark.at >= before
        assert await _keys(stack) == {"demo.class.session.alice.heartbeat"}


async def _activity_writes(stack) -> int:
    """Writes to the activity bucket so far (its stream's last sequence)."""
    info = await stack.js.stream_info(f"KV_{subjects.ACTIVITY_BUCKET}")
    return info.state.last_seq


async def _crowd_once(stack, rounds: int) -> tuple[int, float]:
    """`rounds` x 50 heartbeats of one shared app; the writes they made and the seconds taken."""
    before, started = await _activity_writes(stack), time.monotonic()
    done = stack.handled("heartbeat", "ok")
    for _ in range(rounds):
        await asyncio.gather(*(stack.heartbeat("demo/hello", session=f"v-{i}") for i in range(50)))
    total = done + rounds * 50
    await wait_for(lambda: stack.handled("heartbeat", "ok") >= total, what="heartbeats handled")
    return await _activity_writes(stack) - before, time.monotonic() - started


async def test_a_crowds_heartbeats_write_the_key_once_per_write_interval(settings):
    settings.handlers.activity_write_s = 0.5
    async with running_stack(settings, ["page_load", "heartbeat"]) as stack:
        await stack.register(hello_spec())
        await stack.page_load("demo/hello")
        await stack.wait_state(subjects.app_status("demo/hello"), "ready")
        writes, seconds = await _crowd_once(stack, rounds=4)
        # Concurrent heartbeats before the first write finished each write; after it,
        # one write per 0.5 s at most.
        assert 1 <= writes < 200
        assert writes <= 64 + seconds / 0.5 + 1  # 64: the handler's concurrency
        [mark] = await stack.state.activity.scan()
        assert mark.key == "demo.hello.shared.heartbeat"
        assert time.time() - mark.value.at < seconds + 0.5 + 1.0
        await asyncio.sleep(0.6)  # past the interval: the next heartbeat writes again
        before = mark.value.at
        await stack.heartbeat("demo/hello", session="late")
        await wait_for(lambda: _mark_after(stack, before), what="a write after the interval")


async def _mark_after(stack, at: float) -> bool:
    [mark] = await stack.state.activity.scan()
    return mark.value.at > at


async def test_with_no_write_interval_every_heartbeat_writes(settings):
    settings.handlers.activity_write_s = 0
    async with running_stack(settings, ["page_load", "heartbeat"]) as stack:
        await stack.register(hello_spec())
        await stack.page_load("demo/hello")
        await stack.wait_state(subjects.app_status("demo/hello"), "ready")
        writes, _ = await _crowd_once(stack, rounds=2)
        assert writes == 100
