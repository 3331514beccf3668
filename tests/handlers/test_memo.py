"""A handler process's memory of app specs and activity writes: how long, how much, what not."""

import asyncio

from handlers.memo import Bounded, Latest, Memo
from schemas import subjects
from schemas.spec import IdleLimits
from tests.handlers.test_viz_lifecycle import hello_spec, running_stack
from tests.helpers import wait_for


class Reads:
    """A spec source that counts its reads and says what it holds now."""

    def __init__(self) -> None:
        self.calls, self.value = 0, "v1"

    async def __call__(self, name: str) -> str | None:
        self.calls += 1
        return self.value


async def test_a_spec_is_read_again_once_its_time_is_up_and_absence_is_not_remembered():
    reads, memo = Reads(), Memo(spec_ttl_s=0.2)
    assert [await memo.spec("a/b", reads) for _ in range(5)] == ["v1"] * 5
    assert reads.calls == 1
    reads.value = "v2"
    assert await memo.spec("a/b", reads) == "v1"  # within its time
    await asyncio.sleep(0.25)
    assert await memo.spec("a/b", reads) == "v2" and reads.calls == 2
    reads.value = None
    await asyncio.sleep(0.25)
    assert await memo.spec("a/b", reads) is None
    assert await memo.spec("a/b", reads) is None
    assert reads.calls == 4  # an absent app is read each time


async def test_a_new_epoch_forgets_every_spec_and_forget_drops_one():
    epoch = [0]
    reads, memo = Reads(), Memo(spec_ttl_s=60, epoch=lambda: epoch[0])
    assert await memo.spec("a/b", reads) == "v1" and await memo.spec("c/d", reads) == "v1"
    reads.value = "v2"
    assert await memo.spec("a/b", reads) == "v1" and reads.calls == 2  # remembered
    memo.forget("a/b")  # the watch saw it change
    assert await memo.spec("a/b", reads) == "v2" and await memo.spec("c/d", reads) == "v1"
    epoch[0] += 1  # reconnected: changes to any app may have been missed
    assert await memo.spec("c/d", reads) == "v2" and reads.calls == 4


def test_what_run_request_remembers_survives_a_new_epoch_once_kept_again():
    """run_request's process keeps specs with `remember` and asks `remembered` (it never
    calls `spec`): a reconnect forgets them, and the next spec kept is remembered again."""
    epoch = [0]
    memo = Memo(spec_ttl_s=60, epoch=lambda: epoch[0])
    memo.remember("a/b", "v1")
    assert memo.remembered("a/b") == "v1"
    epoch[0] += 1
    assert memo.remembered("a/b") is None  # forgotten with the epoch
    memo.remember("a/b", "v2")
    assert memo.remembered("a/b") == "v2"  # not forgotten again and again


async def test_off_it_reads_every_time_and_writes_every_time():
    reads, memo = Reads(), Memo()
    for _ in range(3):
        await memo.spec("a/b", reads)
    assert reads.calls == 3
    memo.wrote("k", 100.0)
    assert not memo.written_recently("k", 100.01)


def test_a_write_is_recent_for_its_interval_only():
    memo = Memo(activity_every_s=0.1)
    assert not memo.written_recently("k", 100.0)
    memo.wrote("k", 100.0)
    assert memo.written_recently("k", 100.05)
    assert not memo.written_recently("k", 100.11)
    assert not memo.written_recently("other", 100.05)
    assert not memo.written_recently("k", 99.0)  # a clock that went back: write


def test_bounded_keeps_the_newest_entries():
    kept = Bounded[int](size=3)
    for i, key in enumerate("abcd"):
        kept.set(key, i)
    assert len(kept) == 3 and kept.get("a") is None and kept.get("d") == 3
    kept.set("b", 10)  # set again: newest
    kept.set("e", 4)
    assert kept.get("c") is None and kept.get("b") == 10


async def test_a_changed_spec_reaches_heartbeats_once_the_cache_time_is_up(settings):
    """A heartbeat 30 s after the viewer's last input counts under a 60 s input window,
    not under 10 s; the handler sees the narrower window within `spec_cache_s`."""
    settings.handlers.spec_cache_s = 0.5
    settings.handlers.activity_write_s = 0
    wide = IdleLimits(input_window_s=60)
    async with running_stack(settings, ["page_load", "heartbeat"]) as stack:
        await stack.register(hello_spec(idle=wide))
        await stack.page_load("demo/hello")
        await stack.wait_state(subjects.app_status("demo/hello"), "ready")
        await stack.heartbeat("demo/hello", idle_s=30)
        await wait_for(lambda: _heartbeat_key(stack), what="the counted heartbeat written")
        await stack.register(hello_spec(idle=IdleLimits(input_window_s=10)))
        await asyncio.sleep(0.6)
        [before] = [e for e in await stack.state.activity.scan() if e.key.endswith("heartbeat")]
        await stack.heartbeat("demo/hello", idle_s=30)
        await wait_for(lambda: stack.handled("heartbeat", "ok") == 2, what="heartbeat handled")
        [after] = [e for e in await stack.state.activity.scan() if e.key.endswith("heartbeat")]
        assert after.revision == before.revision  # not counted: the new window was used


async def _heartbeat_key(stack) -> bool:
    return any(e.key.endswith(".heartbeat") for e in await stack.state.activity.scan())


async def test_a_changed_spec_reaches_heartbeats_at_once_however_long_the_memory(settings):
    """The same, with specs remembered for a minute: the watch on the apps bucket drops the
    changed spec from memory, so the next heartbeat reads the narrower window."""
    settings.handlers.spec_cache_s = 60
    settings.handlers.activity_write_s = 0
    async with running_stack(settings, ["page_load", "heartbeat"]) as stack:
        await stack.register(hello_spec(idle=IdleLimits(input_window_s=60)))
        await stack.page_load("demo/hello")
        await stack.wait_state(subjects.app_status("demo/hello"), "ready")
        await stack.heartbeat("demo/hello", idle_s=30)
        await wait_for(lambda: _heartbeat_key(stack), what="the counted heartbeat written")
        await stack.register(hello_spec(idle=IdleLimits(input_window_s=10)))
        await asyncio.sleep(0.3)  # the watch's delivery: milliseconds (the memory holds 60 s)
        [before] = [e for e in await stack.state.activity.scan() if e.key.endswith("heartbeat")]
        await stack.heartbeat("demo/hello", idle_s=30)
        await wait_for(lambda: stack.handled("heartbeat", "ok") == 2, what="heartbeat handled")
        [after] = [e for e in await stack.state.activity.scan() if e.key.endswith("heartbeat")]
        assert after.revision == before.revision  # not counted: the new window was used


def test_latest_keeps_the_newest_revision_and_a_deletion_hides_older_values():
    latest = Latest(size=2)
    latest.saw("demo.a.pool", 5, b"five")
    latest.saw("demo.a.pool", 3, b"three")  # a late copy of an older value
    assert latest.get("demo.a.pool") == (5, b"five")
    latest.saw("demo.a.pool", 6, None)  # deleted
    latest.saw("demo.a.pool", 5, b"five")
    assert latest.get("demo.a.pool") is None
    latest.saw("demo.a.pool", 7, b"seven")
    assert latest.get("demo.a.pool") == (7, b"seven")
    latest.saw("demo.b.pool", 1, b"b")
    latest.saw("demo.c.pool", 1, b"c")  # bounded: the oldest key goes
    assert latest.get("demo.a.pool") is None and latest.get("demo.c.pool") == (1, b"c")
