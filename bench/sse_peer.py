"""The SSE fan-out bench's other processes: the raw aiohttp baseline server and the clients.

`python -m bench.sse_peer raw PORT NATS_URL SUBJECT` is the baseline: a tiny
aiohttp app whose `GET /sse` answers a Server-Sent Events stream (the last
value first, then each change) fed by one core NATS subscription on
`SUBJECT`, with an `asyncio.Queue` per client, as anyone would write it.
It prints `listening` when it serves.

`python -m bench.sse_peer clients HOST PORT PATH N` opens `N` streams (with the
bearer token in `BENCH_TOKEN`, if set),
one after another, on plain asyncio sockets (an HTTP/1.1 GET with `Accept:
text/event-stream`; no client library: at 10,000 streams the clients' own
cost would swamp what is measured). It prints JSON lines on stdout:
`{"ready": true}`, then after `go` on stdin `{"opened": N, "open_s": [...],
"t0", "t1"}` (each open's seconds from connect to the first status, and the
monotonic clock around them all), then `{"k": K, "t": T}` when every one of
its streams has seen the status carrying `"k": K` (or a later one), T on the
monotonic clock, which every process on the machine shares. EOF on stdin
closes the streams and ends it.
"""

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time

import msgpack
import nats
from aiohttp import web

from dispatcher import waits

K_RE = re.compile(rb'"k":(\d+)')
OPEN_TIMEOUT_S = 30.0


# --- the raw aiohttp baseline -------------------------------------------------------------


def _offer(queue: asyncio.Queue, item: bytes) -> None:
    while True:
        try:
            queue.put_nowait(item)
            return
        except asyncio.QueueFull:
            queue.get_nowait()


async def serve_raw(port: int, nats_url: str, subject: str) -> None:
    clients: set[asyncio.Queue] = set()
    last: list[bytes] = []
    seq = 0

    async def on_msg(msg) -> None:
        nonlocal seq
        seq += 1
        data = json.dumps(msgpack.unpackb(msg.data), separators=(",", ":"))
        chunk = f"id: {seq}\nevent: status\ndata: {data}\n\n".encode()
        last[:] = [chunk]
        for queue in clients:
            _offer(queue, chunk)

    async def sse(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"retry: 2000\n\n")
        queue: asyncio.Queue = asyncio.Queue(64)
        for chunk in last:
            queue.put_nowait(chunk)
        clients.add(queue)
        try:
            while True:
                await response.write(await queue.get())
        finally:
            clients.discard(queue)

    nc = await nats.connect(nats_url, name="bench-sse-raw")
    await nc.subscribe(subject, cb=on_msg)
    await nc.flush()
    app = web.Application()
    app.router.add_get("/sse", sse)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    print("listening", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()
    await nc.close()


# --- the clients --------------------------------------------------------------------------


class Stream(asyncio.Protocol):
    """One SSE stream: it sends the request and notes each `"k": K` it reads."""

    def __init__(self, clients: "Clients", request: bytes) -> None:
        self.clients, self.request = clients, request
        self.first: asyncio.Future = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.seen = -1

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        last = None
        for last in K_RE.finditer(self.buf):  # noqa: B007 (the last match is the one we want)
            pass
        if last is None:
            self.buf = self.buf[-256:]
            return
        self.buf = self.buf[last.end() :]
        k = int(last.group(1))
        if not self.first.done():
            self.first.set_result(time.monotonic())
        self.clients.seen(self, k)

    def connection_lost(self, exc) -> None:
        if not self.first.done():
            self.first.set_exception(ConnectionError(f"stream closed before its status: {exc}"))
        self.clients.lost += 1


class Clients:
    def __init__(self, n: int) -> None:
        self.n = n
        self.counts: dict[int, int] = {}
        self.lost = 0

    def seen(self, stream: Stream, k: int) -> None:
        """Count `stream` as having seen every status from its last one up to `k`."""
        for j in range(stream.seen + 1, k + 1):
            count = self.counts[j] = self.counts.get(j, 0) + 1
            if count == self.n and j > 0:
                emit({"k": j, "t": time.monotonic()})
        stream.seen = max(stream.seen, k)


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def run_clients(host: str, port: int, path: str, n: int, token: str | None) -> None:
    loop = asyncio.get_running_loop()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n{auth}\r\n"
    ).encode()
    clients = Clients(n)
    streams: list[Stream] = []
    emit({"ready": True})
    await loop.run_in_executor(None, sys.stdin.readline)  # "go"
    took = []
    t0 = time.monotonic()
    try:
        for _ in range(n):
            start = time.monotonic()
            _, stream = await loop.create_connection(lambda: Stream(clients, request), host, port)
            streams.append(stream)
            took.append(await asyncio.wait_for(stream.first, OPEN_TIMEOUT_S) - start)
    except (OSError, TimeoutError) as exc:
        emit({"error": f"stream {len(took) + 1} of {n} did not open: {exc!r}"})
        return
    emit({"opened": n, "open_s": took, "t0": t0, "t1": time.monotonic()})
    await loop.run_in_executor(None, sys.stdin.read)  # EOF: done
    for stream in streams:
        if stream.transport is not None:
            stream.transport.close()
    with contextlib.suppress(TimeoutError):  # transports report their end on later loop turns
        await waits.until(lambda: clients.lost >= len(streams), 5.0, interval_s=0.01)
    emit({"lost": clients.lost})


def main(argv: list[str]) -> None:
    if argv[0] == "raw":
        asyncio.run(serve_raw(int(argv[1]), argv[2], argv[3]))
    elif argv[0] == "clients":
        host, port, path, n = argv[1], int(argv[2]), argv[3], int(argv[4])
        token = os.environ.get("BENCH_TOKEN")
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_clients(host, port, path, n, token))
    else:
        raise SystemExit(f"unknown command {argv[0]!r}: raw | clients")


if __name__ == "__main__":
    main(sys.argv[1:])
