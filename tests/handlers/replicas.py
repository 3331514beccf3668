"""A handler replica for tests: a handler service on a NATS connection of its own.

Replicas on one cluster share its backend (and the results store), so tests
hand every replica the same ones.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator

from dispatcher import bus, compose
from dispatcher.runtime import Handlers
from dispatcher.settings import Settings
from handlers.ports import Backend, ObjectStore
from handlers.registry import default_registry


@contextlib.asynccontextmanager
async def handler_replica(
    settings: Settings,
    ids: list[str] | None,
    name: str,
    *,
    backend: Backend,
    store: ObjectStore | None = None,
) -> AsyncIterator[Handlers]:
    """Run the handlers `ids` (every one if None) until the block ends, then stop them."""
    nc = await bus.connect(settings.nats, name)
    try:
        state = await compose.provision(nc.jetstream(), settings, default_registry.select(ids))
        service = Handlers(settings, ids, nc=nc, state=state, backend=backend, store=store)
        task = asyncio.create_task(service.run(), name=name)
        try:
            await asyncio.wait_for(service.ready.wait(), 10)
            yield service
        finally:
            service.stop()
            await task
    finally:
        await nc.close()
