"""SSE streams once aiohttp has handed their connections over to the fan-out.

An open stream's connection belongs to its `fanout.Client` (`protocol.detach`):
no aiohttp connection, request or task is left for it. What these tests read
off raw sockets, and what the process holds (its tasks, its file descriptors,
aiohttp's list of connections), is the evidence that such a stream still gets
its changes and keep-alives, ends cleanly, and leaves nothing behind. Each
runs on asyncio's loop and on uvloop, which `spinyard up` runs the gateway on
(the hand-over swaps the transport's protocol, which each loop does its own way).
"""

import asyncio
import gc
import os
import socket

import msgpack
import pytest
from aiohttp.web_protocol import RequestHandler
from yarl import URL

from dispatcher.gateway.keys import STREAMS
from schemas import subjects
from tests.helpers import wait_for

pytestmark = pytest.mark.uvloop

VIZ_STATUS = subjects.app_status("demo/viz")
VIZ_URL = "/v1/apps/demo/viz/status"
REQUEST = f"GET {VIZ_URL} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode()
LAST_CHUNK = b"0\r\n\r\n"


async def publish(env, k: int, **extra) -> None:
    """A status carrying `k`, last: its JSON ends `"k":K}`."""
    await env.js.publish(VIZ_STATUS, msgpack.packb({"state": "ready", **extra, "k": k}))


async def gateway(env, **settings):
    for name, value in settings.items():
        setattr(env.settings.gateway, name, value)
    runner = await env.start()
    env.url = runner.url  # what `env.metrics()` reads
    return runner


async def open_stream(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream on a raw socket, its headers read."""
    u = URL(url)
    reader, writer = await asyncio.open_connection(u.host, u.port, limit=1 << 20)
    writer.write(REQUEST)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
    return reader, writer


async def read_k(reader: asyncio.StreamReader, k: int) -> bytes:
    """What the stream sends up to and including the status carrying `k`."""
    return await asyncio.wait_for(reader.readuntil(b'"k":%d}' % k), 5)


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), 5)


def aiohttp_tasks() -> list[asyncio.Task]:
    """aiohttp's tasks for a connection (its request loop) or a request (its handler)."""
    return [
        t
        for t in asyncio.all_tasks()
        if getattr(t.get_coro(), "__qualname__", "").startswith("RequestHandler.")
    ]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_an_open_stream_holds_no_aiohttp_connection_or_task_yet_gets_everything(env):
    runner = await gateway(env, sse_keepalive_s=0.1, sse_linger_s=0)
    await publish(env, 1)
    streams = [await open_stream(runner.url) for _ in range(10)]
    for reader, _ in streams:
        first = await read_k(reader, 1)
        assert b"retry: 2000\n\n" in first and b"event: status\n" in first
    # aiohttp let go of each connection once its headers were sent.
    await wait_for(lambda: not runner.server.connections, what="aiohttp to forget the streams")
    await wait_for(lambda: not aiohttp_tasks(), what="aiohttp's tasks for the streams to end")
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, RequestHandler)]  # nothing holds one
    assert runner.app[STREAMS].clients == 10
    # Each counts as answered (200) once handed over, not when it ends.
    labels = frozenset({("route", "/v1/apps/{owner}/{title}/status"), ("status", "200")})
    assert (await env.metrics())[("spinyard_gateway_requests_total", labels)] == 10
    try:
        await publish(env, 2)
        for reader, _ in streams:
            event = await read_k(reader, 2)
            # One HTTP chunk holding one SSE event, with its stream sequence as its id.
            assert event.split(b"\r\n")[-1].startswith(b"id: ")
        for reader, _ in streams:
            await asyncio.wait_for(reader.readuntil(b": keepalive\n\n"), 5)
    finally:
        for _, writer in streams:
            writer.close()
    await wait_for(lambda: runner.app[STREAMS].clients == 0, what="the clients to leave")


async def test_a_client_that_goes_leaves_its_topic_and_no_socket_behind(env):
    runner = await gateway(env, sse_linger_s=30.0)  # the subscription stays: not counted
    await publish(env, 1)
    reader, writer = await open_stream(runner.url)
    await read_k(reader, 1)
    writer.close()
    await wait_for(lambda: runner.app[STREAMS].clients == 0, what="the first client to leave")
    before = open_fds()
    streams = [await open_stream(runner.url) for _ in range(5)]
    for reader, _ in streams:
        await read_k(reader, 1)
    assert open_fds() >= before + 10  # each stream's two ends, in this one process
    for _, writer in streams:
        writer.close()
    await wait_for(lambda: runner.app[STREAMS].clients == 0, what="the clients to leave")
    topic = runner.app[STREAMS].fanout.topics[VIZ_STATUS]
    assert not topic.clients and topic.linger is not None
    await wait_for(lambda: open_fds() == before, what="the gateway to close its ends")


async def test_shutdown_ends_each_stream_with_its_last_chunk_and_cuts_a_stuck_one(env):
    before = open_fds()
    runner = await gateway(env, sse_linger_s=0)
    await publish(env, 0)
    streams = [await open_stream(runner.url) for _ in range(3)]
    for reader, _ in streams:
        await read_k(reader, 0)
    u = URL(runner.url)
    stuck = socket.socket()  # it never reads
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(stuck, (u.host, u.port))
        stuck.send(REQUEST)
        await wait_for(lambda: runner.app[STREAMS].clients == 4, what="the stuck client")
        clients = runner.app[STREAMS].fanout.topics[VIZ_STATUS].clients
        k = 0
        while not any(c.paused for c in clients):  # until its socket is full and backed up
            k += 1
            assert k < 300, "the stuck client's socket never filled"
            await publish(env, k, padding="x" * 64_000)
            for reader, _ in streams:
                await read_k(reader, k)

        await asyncio.wait_for(runner.cleanup(), 5)
        env.runners.remove(runner)
        for reader, writer in streams:
            assert (await read_to_end(reader)).endswith(LAST_CHUNK)
            writer.close()
        # The stuck one, never read, could not be ended: its gateway end is cut (only
        # this test's end of it is left).
        await wait_for(lambda: open_fds() == before + 1, what="the stuck stream to be cut")
    finally:
        stuck.close()
    await wait_for(lambda: open_fds() == before, what="every socket of the streams to close")


async def test_a_stream_after_other_requests_on_its_connection_is_handed_over_too(env):
    runner = await gateway(env, sse_linger_s=0)
    await publish(env, 1)
    u = URL(runner.url)
    reader, writer = await asyncio.open_connection(u.host, u.port)
    try:
        for _ in range(2):  # keep-alive: answered by aiohttp as usual
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
        writer.write(REQUEST)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        await read_k(reader, 1)
        await wait_for(lambda: not runner.server.connections, what="aiohttp to let go of it")
        await publish(env, 2)
        await read_k(reader, 2)
    finally:
        writer.close()
    await wait_for(lambda: runner.app[STREAMS].clients == 0, what="the client to leave")


async def test_an_http_1_0_stream_is_not_chunked_and_ends_with_its_connection(env):
    runner = await gateway(env, sse_linger_s=0, sse_keepalive_s=0.1)
    await publish(env, 1)
    u = URL(runner.url)
    reader, writer = await asyncio.open_connection(u.host, u.port)
    try:
        writer.write(REQUEST.replace(b"HTTP/1.1", b"HTTP/1.0"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.0 200") and b"chunked" not in head
        assert (await read_k(reader, 1)).startswith(b"retry: 2000\n\nid: ")
        await publish(env, 2)
        assert (await read_k(reader, 2)).startswith(b"\n\nid: ")  # nothing but SSE
        await asyncio.wait_for(reader.readuntil(b"\n\n: keepalive\n\n"), 5)
        await asyncio.wait_for(runner.cleanup(), 5)
        env.runners.remove(runner)
        rest = await read_to_end(reader)  # up to the connection's end: no last chunk
        assert reader.at_eof() and LAST_CHUNK not in rest
    finally:
        writer.close()


async def test_a_client_sending_more_after_its_stream_began_is_ended(env):
    runner = await gateway(env, sse_linger_s=0)
    await publish(env, 1)
    reader, writer = await open_stream(runner.url)
    try:
        await read_k(reader, 1)
        writer.write(REQUEST)  # pipelined: it would never be answered behind a stream
        assert (await read_to_end(reader)).endswith(LAST_CHUNK)
    finally:
        writer.close()
    await wait_for(lambda: runner.app[STREAMS].clients == 0, what="the client to leave")


class SlowSubscribe:
    """The gateway's JetStream context, its subscriptions held until `go` is set."""

    def __init__(self, js) -> None:
        self.js, self.go = js, asyncio.Event()

    def __getattr__(self, name):
        return getattr(self.js, name)

    async def subscribe(self, *args, **kwargs):
        await self.go.wait()
        return await self.js.subscribe(*args, **kwargs)


async def test_a_stream_ended_before_its_headers_is_answered_503(env):
    runner = await gateway(env, sse_linger_s=0)
    await publish(env, 1)
    streams = runner.app[STREAMS]
    slow = streams.fanout.js = SlowSubscribe(env.js)

    async def get() -> tuple[int, dict]:
        async with env.http.get(runner.url + VIZ_URL, headers={"Accept": "text/event-stream"}) as r:
            return r.status, await r.json()

    opening = asyncio.create_task(get())
    await wait_for(lambda: streams.clients == 1, what="the stream to wait for its subscription")
    streams.close()  # what the gateway's shutdown does first
    slow.go.set()
    status, body = await asyncio.wait_for(opening, 5)
    assert (status, body["error"]["code"]) == (503, "unavailable")
    assert "shutting down" in body["error"]["message"]
    assert streams.clients == 0
