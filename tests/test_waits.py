"""The one bounded wait (dispatcher.waits.until): what it returns, when it gives up."""

import asyncio

import pytest

from dispatcher import waits


async def test_returns_the_first_truthy_value_of_a_sync_or_async_predicate():
    seen = []

    def sync():
        seen.append(1)
        return len(seen) >= 3 and "done"

    assert await waits.until(sync, 1.0, interval_s=0.001) == "done"
    assert len(seen) == 3

    async def later():
        await asyncio.sleep(0)
        return 42

    assert await waits.until(later, 1.0) == 42


async def test_times_out_naming_what_it_waited_for_and_looks_once_at_zero():
    calls = []
    with pytest.raises(TimeoutError, match=r"after 0\.05 s waiting for the moon"):
        await waits.until(lambda: calls.append(1), 0.05, interval_s=0.01, what="the moon")
    assert 2 <= len(calls) <= 10  # it kept looking, and stopped at the deadline

    calls.clear()
    with pytest.raises(TimeoutError):
        await waits.until(lambda: calls.append(1), 0)
    assert len(calls) == 1
