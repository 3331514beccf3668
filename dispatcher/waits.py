"""The one bounded wait: poll a condition until it holds or a deadline passes.

Services wait on events wherever one exists (a watch, a socket, a future);
this is for what can only be looked at — a process gone, a file written, a
consumer caught up. Tests and benchmarks wrap it to fail in their own terms.
"""

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

Predicate = Callable[[], Any | Awaitable[Any]]


async def until(
    predicate: Predicate, timeout_s: float, *, interval_s: float = 0.02, what: str = "condition"
) -> Any:
    """Call `predicate` (sync or async) until it returns something truthy, and return that.

    It is checked once more at the deadline, so a zero timeout is one look.

    Args:
        predicate: what to look at; may return an awaitable.
        timeout_s: how long to keep looking, in seconds.
        interval_s: the pause between looks, in seconds.
        what: named in the error, for whoever reads it.

    Raises:
        TimeoutError: still falsy after `timeout_s`.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value) or isinstance(value, asyncio.Future):
            value = await value
        if value:
            return value
        left = deadline - loop.time()
        if left <= 0:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(min(interval_s, left))
