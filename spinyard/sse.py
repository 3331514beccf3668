"""Status streams over Server-Sent Events, followed across reconnects.

The gateway answers `GET .../status` with `Accept: text/event-stream` by
sending the current status, then each change, each framed as `id: <stream
sequence>`, `event: status` and one `data:` line of JSON (docs/events.md).
It does not read `Last-Event-ID`: every stream, a reconnected one too,
starts with the current status. So when a stream drops (a gateway restarts
or shuts down, a proxy cuts an idle connection, the network blinks) `follow`
connects again after the server's `retry:` delay and skips every status whose
id it has already passed: status is last-value, so nothing still current is
missed, and nothing is shown twice or out of order. A stream that stays
silent past `idle_s` (the gateway sends a keep-alive comment every 15 s) is
taken for dropped.
"""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from pydantic import BaseModel, ValidationError

from spinyard.errors import ApiError, Unreachable

M = TypeVar("M", bound=BaseModel)

RETRY_S = 2.0  # until the server's `retry:` says otherwise (the gateway sends 2000 ms)
HEADERS = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}

ErrorOf = Callable[[aiohttp.ClientResponse], Awaitable[ApiError]]


@dataclass
class Frame:
    """One SSE event: its `id:`, `event:` name and `data:` lines joined."""

    id: int | None
    event: str
    data: str


async def frames(content: aiohttp.StreamReader) -> AsyncIterator[Frame | float]:
    """The stream's events, and its `retry:` delays (seconds), until the server ends it."""
    event, data, ident = "message", [], None
    async for raw in content:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:  # a blank line ends an event
            if data:
                yield Frame(ident, event, "\n".join(data))
            event, data, ident = "message", [], None
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
        elif field == "id" and value.isdigit():
            ident = int(value)
        elif field == "retry" and value.isdigit():
            yield int(value) / 1000
        # `: keepalive` comments, and fields SSE does not define, are ignored


async def follow(
    http: aiohttp.ClientSession,
    url: str,
    params: dict[str, str],
    model: type[M],
    *,
    error_of: ErrorOf,
    idle_s: float,
    tries: int,
) -> AsyncIterator[M]:
    """Each status on the stream at `url`, as `model`, across reconnects (see module doc).

    A status this version of `schemas` cannot read is skipped, as the gateway
    skips one it cannot decode.

    Args:
        error_of: turns an error answer into the `ApiError` to raise.
        idle_s: a stream silent this long (not even a keep-alive) is reconnected.
        tries: connection failures (or 503 answers) in a row before giving up.

    Raises:
        ApiError: the gateway refused the stream (bad token, unknown app or run).
        Unreachable: `tries` connections in a row failed.
    """
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=idle_s, sock_read=idle_s)
    last, failures, retry_s = 0, 0, RETRY_S
    while True:
        problem: Any = None
        try:
            async with http.get(url, params=params, headers=HEADERS, timeout=timeout) as resp:
                if resp.status >= 400:
                    error = await error_of(resp)
                    if resp.status != 503:
                        raise error
                    problem = error
                else:
                    failures = 0
                    async for frame in frames(resp.content):
                        if isinstance(frame, float):
                            retry_s = frame
                            continue
                        if frame.event != "status" or (frame.id is not None and frame.id <= last):
                            continue  # already passed (a reconnected stream starts again)
                        last = frame.id or last
                        try:
                            status = model.model_validate_json(frame.data)
                        except ValidationError:
                            continue
                        yield status
        except (aiohttp.ClientError, TimeoutError) as exc:
            problem = exc
        if problem is not None:
            failures += 1
            if failures >= tries:
                why = str(problem) or type(problem).__name__
                raise Unreachable(f"the status stream at {url} failed {failures} times: {why}")
        await asyncio.sleep(retry_s)
