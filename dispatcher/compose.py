"""The composition root: the one place that builds spinyard's services from settings.

Every part is an async context manager that opens on entry and closes on
exit, so an entry point is one `AsyncExitStack` of them, closed in reverse
order whatever happens:

- `nats_client(settings, name)`: a NATS connection (by role, through the
  credentials in `settings`), drained on exit;
- `provision(js, settings, specs)`: the streams, buckets and the named
  handlers' consumers, created or updated once per process; returns the KV state;
- `backend(settings)`: the backend `settings.backend.kind` names, set up and
  cleaned up (`make_backend` builds it without setting it up);
- `object_store(settings)`: the results store, or None when none is configured;
- `secret_store(settings)`: where apps' secrets are kept, the store of the
  backend `settings.backend.kind` names (`make_secret_store`);
- `gateway(settings, js, state, backend, secrets=)`: the HTTP gateway, listening;
- `handlers(...)`: the handler service, running as a named task, stopped on exit.

`spinyard handlers`, `spinyard gateway` (`serve_handlers`, `serve_gateway`
below) and `spinyard up` (`dispatcher.embedded.up`) assemble these and
nothing else.
"""

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable

import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from dispatcher import bus, logs
from dispatcher.backends.secrets import SecretStore
from dispatcher.bus import provision as bus_provision
from dispatcher.gateway.app import GatewayRunner, start_gateway
from dispatcher.gateway.auth import Authenticator
from dispatcher.gateway.security import Guard
from dispatcher.runtime import Handlers
from dispatcher.settings import Settings, SettingsError
from dispatcher.store import ObjectStore
from handlers.ports import Backend
from handlers.registry import HandlerSpec, Registry
from handlers.state import State
from schemas import subjects

log = logs.get("spinyard.compose")


def pick_gateway_port(settings: Settings) -> None:
    """Choose a free port now when `gateway.port` is 0, so the public URL is known before
    the backend and the gateway's origin checks need it."""
    gw = settings.gateway
    if gw.port == 0:
        with socket.socket(socket.AF_INET6 if ":" in gw.host else socket.AF_INET) as s:
            s.bind((gw.host, 0))
            gw.port = s.getsockname()[1]


def make_backend(settings: Settings) -> Backend:
    """The backend named by `settings.backend.kind`, not yet set up.

    Raises:
        SettingsError: the gateway's public URL is needed and cannot be known yet.
        ValueError: the kind is unknown.
    """
    kind = settings.backend.kind
    if kind == "local":
        from dispatcher.backends.local.backend import LocalBackend

        return LocalBackend(settings.backend.local, settings.data_dir, settings.gateway.base_url)
    if kind == "kubernetes":
        from dispatcher.backends.kubernetes.backend import KubernetesBackend

        k8s = settings.backend.kubernetes
        return KubernetesBackend(k8s, k8s.public_base_url or settings.gateway.base_url)
    raise ValueError(f"unknown backend kind {kind!r}")


def make_secret_store(settings: Settings) -> SecretStore:
    """The secret store the backend `settings.backend.kind` reads, not yet set up: the
    0600 files under `data_dir` (local), or a Secret per app through an API client of
    its own (kubernetes; in a pod, its service account's).

    Raises:
        ValueError: the kind is unknown.
    """
    kind = settings.backend.kind
    if kind == "local":
        from dispatcher.backends.local.secrets import SecretFiles

        return SecretFiles.under(settings.data_dir)
    if kind == "kubernetes":
        from dispatcher.backends.kubernetes.secrets import SecretObjects

        return SecretObjects.connecting(settings.backend.kubernetes)
    raise ValueError(f"unknown backend kind {kind!r}")


@contextlib.asynccontextmanager
async def secret_store(settings: Settings) -> AsyncIterator[SecretStore]:
    """The configured backend's secret store, set up; closed on exit."""
    store = make_secret_store(settings)
    await store.setup()
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def nats_client(
    settings: Settings, name: str, *, wait_s: float | None = None
) -> AsyncIterator[Client]:
    """A NATS connection with `settings.nats`' credentials; drained on exit (closed, if
    the server is gone and there is nothing to drain)."""
    nc = await bus.connect(settings.nats, name, wait_s=wait_s)
    try:
        yield nc
    finally:
        try:
            await nc.drain()
        except (nats.errors.Error, OSError) as exc:  # the server is gone: nothing to drain
            log.warning("nats_drain_failed", client=name, error=repr(exc))
            with contextlib.suppress(nats.errors.Error, OSError):
                await nc.close()  # closing flushes too, and may meet the same dead socket


async def provision(js: JetStreamContext, settings: Settings, specs: list[HandlerSpec]) -> State:
    """Create or update the streams, KV buckets and `specs`' durable consumers; the KV state."""
    return await bus_provision.ensure(js, settings.nats, specs, settings.handlers)


@contextlib.asynccontextmanager
async def backend(settings: Settings) -> AsyncIterator[Backend]:
    """The configured backend, set up; cleaned up on exit (what it runs keeps running)."""
    made = make_backend(settings)
    await made.setup()
    try:
        yield made
    finally:
        await made.cleanup()


@contextlib.asynccontextmanager
async def object_store(settings: Settings) -> AsyncIterator[ObjectStore | None]:
    """The results store (its bucket made), or None when no S3 credentials are set."""
    if settings.store.access_key is None:
        yield None
        return
    store = ObjectStore(settings.store)
    await store.setup()
    try:
        yield store
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def gateway(
    settings: Settings,
    js: JetStreamContext,
    state: State,
    backend: Backend | None,
    *,
    metrics: CollectorRegistry | None = None,
    secrets: SecretStore | None = None,
) -> AsyncIterator[GatewayRunner]:
    """The HTTP gateway, listening; stopped on exit.

    `backend` serves the app proxy (local backend); `metrics` is the process's
    Prometheus registry, which its `/metrics` serves (a new one if None); `secrets`
    is where it writes apps' secrets (None: it has no secrets routes).
    """
    guard = Guard(settings.auth, state, settings.gateway.base_url)
    runner = await start_gateway(
        settings.gateway,
        js=js,
        state=state,
        backend=backend,
        guard=guard,
        metrics_registry=metrics,
        secrets=secrets,
    )
    try:
        yield runner
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def handlers(
    settings: Settings,
    nc: Client,
    state: State,
    *,
    backend: Backend,
    store: ObjectStore | None,
    kinds: list[str] | None = None,
    registry: Registry | None = None,
    metrics: CollectorRegistry | None = None,
) -> AsyncIterator[Handlers]:
    """The handler service running as a task, ready; on exit it stops and is awaited.

    Its metrics go on `metrics`, the process's Prometheus registry (a new one if None).

    Raises:
        RuntimeError: on exit, if a root task of the service died.
    """
    service = Handlers(
        settings,
        kinds,
        nc=nc,
        state=state,
        backend=backend,
        store=store,
        registry=registry,
        metrics_registry=metrics,
    )
    task = asyncio.create_task(service.run(), name="handlers")
    ready = asyncio.create_task(service.ready.wait(), name="handlers-ready")
    await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if task.done():
        await task  # it died while starting: raise why
    try:
        yield service
    finally:
        service.stop()
        await task


# Handler kinds that use object storage: presigned upload URLs, results.
STORE_KINDS = (subjects.RUN_START, subjects.JOB_UPDATE)


def needs_store(specs: list[HandlerSpec]) -> bool:
    """Whether any of `specs` starts runs or collects their results (and so needs storage)."""
    return any(spec.kind in STORE_KINDS for spec in specs)


async def serve_handlers(
    settings: Settings,
    kinds: list[str] | None,
    *,
    started: Callable[[Handlers], None] = lambda _: None,
    registry: Registry | None = None,
) -> None:
    """`spinyard handlers`: run the named handler kinds (all if none) until stopped.

    Raises:
        KeyError: a kind is not registered.
        SettingsError: run handlers without object storage settings.
        RuntimeError: a root task of the service died.
    """
    from handlers.registry import default_registry

    specs = (registry or default_registry).select(kinds)
    if settings.store.access_key is None and needs_store(specs):
        raise SettingsError(
            "run handlers need object storage: set SPINYARD_STORE__ENDPOINT, "
            "SPINYARD_STORE__ACCESS_KEY and SPINYARD_STORE__SECRET_KEY"
        )
    async with contextlib.AsyncExitStack() as stack:
        made = await stack.enter_async_context(backend(settings))
        store = await stack.enter_async_context(object_store(settings))
        nc = await stack.enter_async_context(nats_client(settings, "spinyard-handlers"))
        state = await provision(nc.jetstream(), settings, specs)
        service = await stack.enter_async_context(
            handlers(settings, nc, state, backend=made, store=store, kinds=kinds, registry=registry)
        )
        started(service)
        await service.stopping.wait()  # a signal, or a root task that died (raised on exit)


async def serve_gateway(
    settings: Settings,
    stop: asyncio.Event,
    *,
    started: Callable[[GatewayRunner], None] = lambda _: None,
) -> None:
    """`spinyard gateway`: serve the HTTP gateway against the configured NATS until `stop`.

    It creates nothing on JetStream (its NATS role may not): it opens the
    buckets it reads, and the handlers create the rest. It proxies apps only
    for the local backend; on Kubernetes the ingress routes to them. It writes
    apps' secrets to the backend's store (`secret_store`): the local backend's
    data dir, which it must share, or the apps namespace's Secrets.

    Raises:
        SettingsError: authentication is on without a key, or a key is too weak.
    """
    Authenticator(settings.auth)  # a missing or weak key is an error before anything starts
    pick_gateway_port(settings)
    async with contextlib.AsyncExitStack() as stack:
        proxied = None
        if settings.backend.kind == "local":
            proxied = await stack.enter_async_context(backend(settings))
        nc = await stack.enter_async_context(nats_client(settings, "spinyard-gateway"))
        js = nc.jetstream()
        state = await bus_provision.open_state(js, settings.nats.startup_wait_s)
        secrets = await stack.enter_async_context(secret_store(settings))
        runner = await stack.enter_async_context(
            gateway(settings, js, state, proxied, secrets=secrets)
        )
        started(runner)
        await stop.wait()
