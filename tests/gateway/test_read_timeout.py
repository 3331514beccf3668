"""The gateway's read deadline: clients that send a request's head or body too slowly are cut
off; idle keep-alive connections between requests, long answers (SSE) and WebSockets are not."""

import asyncio
import time

import pytest
from yarl import URL

from schemas import subjects
from schemas.status import AppState, AppStatus

TIMEOUT_S = 0.5


@pytest.fixture
async def gateway(env):
    env.settings.gateway.read_timeout_s = TIMEOUT_S
    env.url = (await env.start()).url
    return env


async def connect(env) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = URL(env.url)
    return await asyncio.open_connection(url.host, url.port)


async def trickle_until_closed(
    reader, writer, head: bytes, drip: bytes, limit_s: float, started: float | None = None
) -> float:
    """Send `head`, then one byte of `drip` every 50 ms; seconds until the server closed,
    counted from `started` (default: now)."""
    started = time.monotonic() if started is None else started
    writer.write(head)
    for i in range(10_000):
        if time.monotonic() - started > limit_s:
            raise AssertionError(f"still open after {limit_s} s")
        try:
            writer.write(drip[i % len(drip) : i % len(drip) + 1])
            await writer.drain()
            await asyncio.wait_for(reader.read(1024), 0.05)
        except TimeoutError:
            continue
        except ConnectionError:
            break
        if reader.at_eof():
            break
    writer.close()
    return time.monotonic() - started


async def test_a_slow_head_is_closed_after_the_deadline(gateway):
    reader, writer = await connect(gateway)
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    took = await trickle_until_closed(reader, writer, head, b"X-Slow: aaaa\r\n", limit_s=10)
    assert took >= TIMEOUT_S * 0.9


async def test_a_connection_that_sends_nothing_is_closed(gateway):
    reader, writer = await connect(gateway)
    started = time.monotonic()
    async with asyncio.timeout(10):
        assert await reader.read() == b""
    assert time.monotonic() - started >= TIMEOUT_S * 0.9
    writer.close()


async def test_a_slow_body_is_closed_and_nothing_is_published(gateway):
    reader, writer = await connect(gateway)
    head = b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: 4000\r\n\r\n"
    took = await trickle_until_closed(reader, writer, head, b'{"type": "page_load"', limit_s=10)
    assert took >= TIMEOUT_S * 0.9
    assert await gateway.events_published() == 0


async def test_many_slow_clients_are_all_closed(gateway):
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"

    async def slow_client() -> float:
        started = time.monotonic()  # the server's clock starts at the connection
        reader, writer = await connect(gateway)
        drip = b"X-Slow: a\r\n"
        return await trickle_until_closed(reader, writer, head, drip, 20, started)

    took = await asyncio.gather(*(slow_client() for _ in range(150)))
    assert min(took) >= TIMEOUT_S * 0.9


async def test_the_clock_starts_with_each_request_not_the_connection(gateway):
    reader, writer = await connect(gateway)
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    for _ in range(3):  # idle for longer than the deadline between requests
        writer.write(request)
        async with asyncio.timeout(5):
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            assert b'"ok": true' in await reader.readexactly(length)
        await asyncio.sleep(TIMEOUT_S * 2)
    writer.close()


async def test_sse_streams_outlive_the_deadline(gateway):
    gateway.settings.gateway.sse_keepalive_s = 0.1
    url = (await gateway.start()).url
    subject = subjects.app_status("demo/viz")
    sse = {"Accept": "text/event-stream"}
    async with gateway.http.get(f"{url}/v1/apps/demo/viz/status", headers=sse) as resp:
        assert resp.status == 200
        started = time.monotonic()
        while time.monotonic() - started < TIMEOUT_S * 4:
            async with asyncio.timeout(5):
                assert await resp.content.readline() != b""  # keep-alives keep coming
        await gateway.publish_status(subject, AppStatus(app="demo/viz", state=AppState.READY))
        async with asyncio.timeout(5):
            while not (line := await resp.content.readline()).startswith(b"data:"):
                assert line != b""
        assert b'"state":"ready"' in line
