"""Fixtures of the gateway tests: a gateway on a real nats-server, and an app server to proxy to."""

import asyncio

import aiohttp
import pytest
import uvloop
from aiohttp import web

from dispatcher import bus
from dispatcher.backends.local.secrets import SecretFiles
from dispatcher.gateway.security import Guard
from dispatcher.settings import AuthSettings
from tests.gateway.support import JOB, PER, PREFIX, PUBLISH_SECRET, VIZ, Env, TargetBackend


@pytest.fixture
async def env(settings):
    nc = await bus.connect(settings.nats, "test-gateway")
    js = nc.jetstream(timeout=2.0)
    state = await bus.ensure(js, settings.nats, [], settings.handlers)
    for spec in (VIZ, PER, JOB):
        await state.apps.put(spec.name, spec)
    http = aiohttp.ClientSession()
    e = Env(settings, nc, js, state, TargetBackend(), http)
    try:
        e.url = (await e.start()).url
        yield e
    finally:
        await http.close()
        for runner in e.runners:
            await runner.cleanup()
        try:
            await nc.close()
        except ConnectionError:
            # With the server stopped, nats-py's close() raises before it cancels its
            # subscriptions' tasks (nats/aio/client.py `_close`); finish that for it.
            for sub in nc._subs.values():
                if sub._wait_for_msgs_task is not None:
                    sub._wait_for_msgs_task.cancel()


@pytest.fixture
async def gw(env):
    """The env with a second gateway whose guard checks tokens (signed with
    `PUBLISH_SECRET`); `gw.url` is that one."""
    guard = Guard(AuthSettings(hs256_secret=PUBLISH_SECRET), env.state, "http://gw")
    env.url = (await env.start(guard=guard)).url
    return env


@pytest.fixture
async def sgw(env, tmp_path):
    """The env with a gateway like `gw`'s that keeps apps' secrets in files under
    `sgw.secrets.root` (the local backend's store)."""
    guard = Guard(AuthSettings(hs256_secret=PUBLISH_SECRET), env.state, "http://gw")
    env.secrets = SecretFiles.under(tmp_path / "data")
    env.url = (await env.start(guard=guard, secrets=env.secrets)).url
    return env


@pytest.fixture
async def upstream():
    """A real little app server under the instance's prefix."""
    seen: dict = {"ws_closed": asyncio.Event()}

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "headers": dict(request.headers),
                "body_len": len(body),
            },
            headers={"X-Upstream": "yes", "Set-Cookie": "sid=1; Path=/"},
        )

    async def teapot(_):
        return web.Response(status=418, text="short and stout")

    async def moved(_):
        raise web.HTTPFound(f"{PREFIX}/elsewhere")

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse(protocols=("bokeh",))
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == aiohttp.WSMsgType.TEXT and msg.data == "bye":
                await sock.close(code=4000, message=b"done")
            elif msg.type == aiohttp.WSMsgType.TEXT:
                await sock.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await sock.send_bytes(msg.data[::-1])
        seen["ws_closed"].set()
        return sock

    app = web.Application()
    app.router.add_get(f"{PREFIX}/ws", ws)
    app.router.add_get(f"{PREFIX}/teapot", teapot)
    app.router.add_get(f"{PREFIX}/moved", moved)
    app.router.add_route("*", PREFIX + "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    seen["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield seen
    await runner.cleanup()


def pytest_asyncio_loop_factories(config, item):
    """The event loops a gateway test runs on: asyncio's, and uvloop too for tests marked
    `uvloop` (`spinyard up` runs its gateway on uvloop)."""
    if item.get_closest_marker("uvloop") is not None:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}
