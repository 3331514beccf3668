"""The raw aiohttp baselines of the gateway bench, run in their own process like the gateway.

`python -m bench.gateway_peer PORT [NATS_URL]` serves, on 127.0.0.1:PORT, with
nothing but aiohttp, nats-py and the standard library:

- `POST /events`: reads the body, parses it as JSON and answers 202 with a small
  JSON body (what `POST /v1/events` answers, without checks, NATS or handlers);
- `GET /status`: a Server-Sent Events stream that first sends one status line,
  then every line posted to `POST /publish`;
- `POST /stored`: parses the JSON body, publishes it to JetStream (`STORED_SUBJECT`,
  its id as the de-duplication id) and answers 202 once JetStream has acked it: the
  least any server that promises "stored" with its 202 must do (only given NATS_URL);
- `POST /publish`: parses the JSON body, writes it as one SSE line to every open
  stream, then answers 202 (a POST turned into an SSE line with no bus between).

SIGTERM stops it.
"""

import asyncio
import json
import signal
import sys
import time

import nats
from aiohttp import web
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StreamConfig

STREAMS = web.AppKey("streams", set)
JS = web.AppKey("js", JetStreamContext)
STORED_STREAM = "BENCH_GW"
STORED_SUBJECT = "bench.gw.events"


async def setup(js: JetStreamContext) -> None:
    """The stream `POST /stored` publishes to (the bench makes it before starting the peer)."""
    await js.add_stream(
        StreamConfig(
            name=STORED_STREAM,
            subjects=[STORED_SUBJECT],
            retention=RetentionPolicy.LIMITS,
            max_msgs=100_000,
        )
    )


async def events(request: web.Request) -> web.Response:
    body = json.loads(await request.read())
    return web.json_response({"id": body.get("id", "x"), "time": time.time()}, status=202)


async def stored(request: web.Request) -> web.Response:
    body = json.loads(await request.read())
    data = json.dumps(body).encode()
    await request.app[JS].publish(STORED_SUBJECT, data, headers={"Nats-Msg-Id": body["id"]})
    return web.json_response({"id": body["id"], "time": time.time()}, status=202)


async def status(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(b'event: status\ndata: {"state":"ready"}\n\n')
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    request.app[STREAMS].add(queue)
    try:
        while True:
            await response.write(await queue.get())
    finally:
        request.app[STREAMS].discard(queue)


async def publish(request: web.Request) -> web.Response:
    body = json.loads(await request.read())
    line = f"event: status\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()
    for queue in request.app[STREAMS]:
        queue.put_nowait(line)
    return web.json_response({"id": body.get("id", "x"), "time": time.time()}, status=202)


async def serve(port: int, nats_url: str | None) -> None:
    nc = await nats.connect(nats_url, name="bench-gateway-peer") if nats_url else None
    app = web.Application()
    app[STREAMS] = set()
    app.router.add_post("/events", events)
    if nc is not None:
        app[JS] = nc.jetstream()
        app.router.add_post("/stored", stored)
    app.router.add_get("/status", status)
    app.router.add_post("/publish", publish)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()
    if nc is not None:
        await nc.close()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None))
