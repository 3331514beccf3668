"""HTTP pieces of the gateway bench: an SSE reader, viewers posting in a loop, /metrics sums.

Every figure is taken from this process's clock (`time.perf_counter`), as a
browser would see it: a POST's answer, or a status line's arrival on a stream
that is already open.
"""

import asyncio
import json
import time
from collections.abc import Callable

import aiohttp

from bench.stack import BenchError, Process

TIMEOUT_S = 30.0  # any one answer; far above any expected figure


class SseStream:
    """One open Server-Sent Events stream; its `status` events are queued with their
    arrival time."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[float, dict]] = asyncio.Queue()
        self.response: aiohttp.ClientResponse | None = None
        self._reader: asyncio.Task | None = None

    async def open(self, http: aiohttp.ClientSession, url: str, headers: dict) -> float:
        """Open the stream; seconds from the request to its first status event."""
        t0 = time.perf_counter()
        self.response = await http.get(
            url, headers=headers | {"Accept": "text/event-stream"}, timeout=None
        )
        if self.response.status != 200:
            raise BenchError(f"GET {url}: {self.response.status} {await self.response.text()}")
        self._reader = asyncio.create_task(self._read(), name="sse-reader")
        at, _ = await self.next()
        return at - t0

    async def _read(self) -> None:
        assert self.response is not None
        event, data = None, []
        async for raw in self.response.content:
            line = raw.decode().rstrip("\r\n")
            if not line:
                if event == "status" and data:
                    self.queue.put_nowait((time.perf_counter(), json.loads("\n".join(data))))
                event, data = None, []
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].lstrip())

    def clear(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()

    async def next(self, want: Callable[[dict], bool] = lambda _: True) -> tuple[float, dict]:
        """The arrival time and body of the next status `want`s; raise on `failed`."""
        async with asyncio.timeout(TIMEOUT_S):
            while True:
                at, status = await self.queue.get()
                if status.get("state") == "failed":
                    raise BenchError(f"status failed: {status.get('error')}")
                if want(status):
                    return at, status

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self.response is not None:
            self.response.close()


async def post(http: aiohttp.ClientSession, url: str, body: dict, headers: dict) -> float:
    """Seconds from sending `body` to a 202; BenchError on any other answer."""
    t0 = time.perf_counter()
    async with http.post(url, json=body, headers=headers) as resp:
        await resp.read()
        took = time.perf_counter() - t0
        if resp.status != 202:
            raise BenchError(f"POST {url}: {resp.status} {await resp.text()}")
    return took


async def viewers(
    http: aiohttp.ClientSession,
    url: str,
    make: Callable[[int, int], tuple[dict, dict]],
    count: int,
    seconds: float,
) -> tuple[int, int]:
    """`count` viewers posting back to back for `seconds`; (accepted, refused) answers.

    `make(viewer, i)` gives the i-th body and headers of a viewer.
    """
    accepted = refused = 0
    deadline = time.perf_counter() + seconds

    async def viewer(v: int) -> None:
        nonlocal accepted, refused
        i = 0
        while time.perf_counter() < deadline:
            body, headers = make(v, i)
            async with http.post(url, json=body, headers=headers) as resp:
                await resp.read()
                if resp.status == 202:
                    accepted += 1
                else:
                    refused += 1
            i += 1

    await asyncio.gather(*(viewer(v) for v in range(count)))
    return accepted, refused


async def outcomes(http: aiohttp.ClientSession, url: str, handlers: tuple[str, ...]) -> dict:
    """Messages of `handlers` settled, by outcome (`ok`, `retried`, `dead_lettered`, ...),
    summed from the Prometheus text at `url`; `settled` is every outcome but `retried`."""
    async with http.get(url) as resp:
        text = await resp.text()
    counts: dict[str, int] = {"settled": 0}
    prefix = "spinyard_handler_messages_total{"
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        labels, value = line[len(prefix) :].rsplit("} ", 1)
        pairs = {k: v.strip('"') for k, v in (p.split("=", 1) for p in labels.split(","))}
        if pairs["handler"] in handlers:
            outcome, n = pairs["outcome"], int(float(value))
            counts[outcome] = counts.get(outcome, 0) + n
            if outcome != "retried":
                counts["settled"] += n
    return counts


async def answers(http: aiohttp.ClientSession, proc: Process, url: str) -> bool:
    """Whether `url` answers 200 (BenchError if `proc` has exited)."""
    proc.check()
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False
