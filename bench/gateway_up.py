"""The gateway bench's `spinyard up` variant: the load phase against the whole stack in one
process tree (nats-server, S3 server, handlers and gateway sharing one event loop).

`spinyard up --apps examples/hello` registers the app as `demo/hello` and serves
Prometheus metrics (the handlers' too) on the gateway's `/metrics`. Its NATS has
passwords, so the backlog here is accepted minus settled, read from `/metrics`.
"""

import sys
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp

from bench.gateway import HELLO_SPEC, SECRET, UP_APP, Sizes, event, load_level
from bench.stack import Process, clean_env, free_port, wait_until
from bench.viewers import SseStream, answers, post
from dispatcher.gateway.auth import mint


async def up_load(tmp: Path, sizes: Sizes) -> dict:
    """`spinyard up` (nats-server, S3, handlers and gateway in one process tree) under
    `sizes.up_viewers` viewers, with the raw aiohttp peer as its baseline."""
    async with AsyncExitStack() as stack:
        port, peer_port = free_port(), free_port()
        url, peer_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer_port}"
        env = clean_env({
            "SPINYARD_DATA_DIR": str(tmp / "up-data"), "SPINYARD_AUTH__HS256_SECRET": SECRET,
            "SPINYARD_LOG_LEVEL": "warning", "SPINYARD_LOG_FORMAT": "json",
        })  # fmt: skip
        argv = [sys.executable, "-m", "dispatcher.cli", "up", "--apps", str(HELLO_SPEC.parent)]
        up = Process("spinyard up", [*argv, "--port", str(port)], env, tmp / "up.log", group=True)
        stack.callback(up.start().stop)
        peer = Process(
            "raw aiohttp peer",
            [sys.executable, "-m", "bench.gateway_peer", str(peer_port)],
            clean_env({}),
            tmp / "up-peer.log",
        ).start()
        stack.callback(peer.stop)
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        stack.push_async_callback(http.close)
        for proc, health_url in ((up, f"{url}/healthz"), (peer, f"{peer_url}/status")):
            await wait_until(lambda p=proc, u=health_url: answers(http, p, u), 60.0, proc.name)
        token = mint(SECRET, [UP_APP], session="s-bench", ttl_s=3600)
        auth = {"Authorization": f"Bearer {token}", "Origin": url}
        sse = SseStream()
        stack.push_async_callback(sse.close)
        await post(http, f"{url}/v1/events", event("page_load", "s-bench", UP_APP), auth)
        await sse.open(http, f"{url}/v1/apps/{UP_APP}/status", auth)
        await sse.next(lambda s: s.get("state") == "ready")  # warm before the load
        level = await load_level(
            http, None, url, f"{url}/metrics", peer_url, sizes.up_viewers, sizes
        )
        up.check()
        return level
