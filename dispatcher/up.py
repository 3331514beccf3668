"""`spinyard up`: the whole embedded stack in one process tree.

It starts a nats-server (store under the data dir), the local backend, every
handler and the gateway; registers the app specs it finds; and on Ctrl-C or
SIGTERM stops the handlers, the gateway, every app instance it started and
the nats-server, in that order, leaving no process behind.
"""

import asyncio
import socket
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path

from dispatcher import bus, logs
from dispatcher.apps import find_specs, register
from dispatcher.backends.base import make_backend
from dispatcher.gateway.app import start_gateway
from dispatcher.natsserver import NatsServer
from dispatcher.runtime import Handlers
from dispatcher.settings import Settings
from handlers.ports import Backend

log = logs.get("spinyard.up")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


async def stop_all_instances(backend: Backend) -> None:
    """Stop every instance the backend runs for spinyard (used when `up` exits)."""
    instances = await backend.list_instances()
    await asyncio.gather(*(backend.stop_viz(i.id) for i in instances if i.kind == "viz"))
    for job in (i for i in instances if i.kind == "job"):
        await backend.cancel_job(job.id)
    if instances:
        log.info("instances_stopped", count=len(instances))


class Stack:
    """The embedded stack. `run()` until `stop()`."""

    def __init__(self, settings: Settings, app_dirs: list[Path], port: int | None = None):
        self.settings = settings
        self.app_dirs = app_dirs
        if port is not None:
            settings.gateway.port = port
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()
        self.url: str | None = None

    def stop(self) -> None:
        self._stop.set()

    async def run(self, announce: Callable[[str], None] = lambda _: None) -> None:
        settings = self.settings
        data_dir = settings.data_dir.resolve()
        settings.data_dir = data_dir
        async with AsyncExitStack() as stack:
            nats_server = NatsServer(data_dir / "nats").start()
            stack.callback(nats_server.stop)
            settings.nats.url = nats_server.url

            gw = settings.gateway
            if gw.port == 0:
                gw.port = free_port(gw.host)
            gw.public_url = gw.public_url or f"http://{gw.host}:{gw.port}"
            backend = make_backend(settings)
            await backend.setup()
            stack.push_async_callback(backend.cleanup)
            stack.push_async_callback(stop_all_instances, backend)

            nc = await bus.connect(settings.nats, name="spinyard-up")
            stack.push_async_callback(nc.drain)
            handlers = Handlers(settings, backend=backend, nc=nc)
            js = nc.jetstream()
            state = await bus.ensure(js, settings.nats, handlers.specs, settings.handlers)
            paths = [p for d in self.app_dirs for p in find_specs(d)]
            specs = await register(state, paths)

            handlers_task = asyncio.create_task(handlers.run(), name="handlers")
            runner = await start_gateway(settings.gateway, js=js, state=state, backend=backend)
            stack.push_async_callback(runner.cleanup)
            await handlers.ready.wait()

            self.url = gw.public_url
            announce(
                f"spinyard is up.\n"
                f"  demo:    {gw.public_url}/demo\n"
                f"  API:     {gw.public_url}/v1/apps\n"
                f"  NATS:    {nats_server.url}\n"
                f"  apps:    {', '.join(s.name for s in specs) or 'none'}\n"
                f"Press Ctrl-C to stop."
            )
            self.ready.set()
            stopper = asyncio.create_task(self._stop.wait(), name="stop-waiter")
            await asyncio.wait([handlers_task, stopper], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            handlers.stop()
            await handlers_task
        log.info("stack_stopped")


async def run_gateway_only(
    settings: Settings, stop: asyncio.Event, announce: Callable[[str], None] = lambda _: None
) -> None:
    """Run just the gateway against the configured NATS (for `spinyard gateway`)."""
    async with AsyncExitStack() as stack:
        backend = make_backend(settings)
        await backend.setup()
        stack.push_async_callback(backend.cleanup)
        nc = await bus.connect(settings.nats, name="spinyard-gateway")
        stack.push_async_callback(nc.drain)
        js = nc.jetstream()
        state = await bus.ensure_state(js, settings.nats)
        await bus.ensure_streams(js, settings.nats)
        runner = await start_gateway(settings.gateway, js=js, state=state, backend=backend)
        stack.push_async_callback(runner.cleanup)
        announce(f"gateway listening on {settings.gateway.host}:{settings.gateway.port}")
        await stop.wait()
