"""The handler service: run handler consumers, the reaper's ticker and the job watcher.

`Handlers` is what `spinyard handlers <kind>...` runs and what `spinyard up`
embeds; `dispatcher.compose` gives it its NATS connection, KV state (already
provisioned), backend and store. Everything it opens itself is closed in
reverse order by one `AsyncExitStack`. On stop it stops fetching, lets in-flight messages finish
within the grace period, and drains NATS. If any root task dies, the whole
service stops instead of running on half-alive; the bus going away for a while
(a reconnect, a lost cluster node) is not that: the consumers wait it out and
`/healthz` says so meanwhile.
"""

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any

from aiohttp import web
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from dispatcher import logs
from dispatcher.bus.consumer import Consumer, HandlerMetrics
from dispatcher.bus.deadletter import dead_letter_exhausted
from dispatcher.bus.watch import watch_apps, watch_keys
from dispatcher.metrics import exposition
from dispatcher.settings import Settings, SettingsError
from handlers import catalog  # noqa: F401 - registers the built-in handlers
from handlers.context import Context, Knobs
from handlers.memo import Latest, Memo
from handlers.pools import POOL_KEYS
from handlers.ports import Backend, ObjectStore
from handlers.registry import HandlerSpec, Registry, default_registry
from handlers.state import State
from schemas import subjects
from schemas.codec import encode
from schemas.events import JobUpdate, ReaperTick

log = logs.get("spinyard.runtime")


async def tick_forever(js: JetStreamContext, interval_s: float, stopping: asyncio.Event) -> None:
    """Publish a reaper tick each interval. Every reaper replica does; JetStream keeps one."""
    while not stopping.is_set():
        slot = math.floor(time.time() / interval_s)
        tick = ReaperTick(id=f"tick-{slot}")
        try:
            await js.publish(
                subjects.event_for(subjects.REAPER_TICK, "tick"),
                encode(tick),
                headers={"Nats-Msg-Id": tick.id},
            )
        except Exception as exc:  # NATS reconnecting: try again next interval
            log.warning("tick_not_published", error=repr(exc))
        next_at = (slot + 1) * interval_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), max(0.0, next_at - time.time()))


def job_reporter(js: JetStreamContext):
    """Publish a backend's job report as a job_update event, one per job and state."""

    async def report(update: JobUpdate) -> None:
        msg_id = f"{update.job_id}.{update.state}"
        await js.publish(
            subjects.event_for(subjects.JOB_UPDATE, update.job_id),
            encode(update),
            headers={"Nats-Msg-Id": msg_id},
        )

    return report


async def serve_health(
    service: "Handlers", nc: Client, consumers: list[Consumer], tasks: list[asyncio.Task]
) -> web.AppRunner:
    """`/healthz` and `/metrics`.

    `/healthz` answers 503 while NATS is disconnected or a consumer cannot
    fetch (`failing` names those), and once a root task died or the service
    stops; 200 again when the bus is back by itself.
    """

    async def healthz(_: web.Request) -> web.Response:
        failing = [c.spec.id for c in consumers if not c.healthy]
        ok = (
            nc.is_connected
            and not failing
            and not any(t.done() for t in tasks)
            and not service.stopping.is_set()
        )
        body = {"ok": ok, "nats": nc.is_connected, "failing": failing}
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        body, content_type = exposition(service.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    settings = service.settings.handlers
    await web.TCPSite(runner, settings.health_host, settings.health_port).start()
    service.health_port = runner.addresses[0][1]
    log.info("health_server_started", port=service.health_port)
    return runner


async def run_start_hooks(ctx: Context, specs: list[HandlerSpec]) -> None:
    """Run each handler's start hook once, before any consumer fetches.

    A hook that fails is logged and serving goes on: what it would have
    cleaned up, the reaper's next passes clean up too.
    """
    hooks = {spec.on_start: spec.id for spec in specs if spec.on_start is not None}
    for hook, handler_id in hooks.items():
        try:
            await hook(ctx.bind(handler=handler_id))
        except Exception as exc:
            log.warning("start_hook_failed", handler=handler_id, error=repr(exc))


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop a handler process runs on (setting `event_loop`); None: asyncio's own.

    uvloop spends less time per message in the loop and its socket writes
    (docs/benchmarks.md, "handlers"); "auto" takes it when it is installed.

    Raises:
        SettingsError: "uvloop" is chosen and not installed.
    """
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SettingsError("SPINYARD_EVENT_LOOP=uvloop, but uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def run_service(main: Coroutine[Any, Any, int], choice: str) -> int:
    """Run a service's main coroutine to its end on the chosen event loop."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)


def make_knobs(settings: Settings) -> Knobs:
    return Knobs(
        pool_refill_per_tick=settings.reaper.pool_refill_per_tick,
        reconcile_grace_s=settings.reaper.reconcile_grace_s,
        run_slots=settings.handlers.run_slots,
        max_concurrent_starts=settings.handlers.max_concurrent_starts,
    )


CLAIMERS = (subjects.PAGE_LOAD, subjects.RUN_START)  # the handlers that take pool members


class Handlers:
    """A handler service: the named handlers (all if none) and, with the reaper, its ticker."""

    def __init__(
        self,
        settings: Settings,
        handler_ids: list[str] | None = None,
        *,
        nc: Client,
        state: State,
        backend: Backend,
        store: ObjectStore | None = None,
        registry: Registry | None = None,
        metrics_registry: CollectorRegistry | None = None,
        now: Callable[[], float] = time.time,
    ):
        """
        Args:
            settings: spinyard's settings.
            handler_ids: the handlers to run; all registered ones if None or empty.
            nc: the NATS connection (its owner closes it).
            state: the KV state; its buckets and the handlers' consumers exist
                (`dispatcher.compose.provision`).
            backend: where apps and jobs run, set up.
            store: the results store; run handlers need one.
            registry: where the handlers are registered; the default registry otherwise.
            metrics_registry: the Prometheus registry its metrics go on (one per process,
                shared with a gateway in it); a new one if None.
            now: the handlers' clock (`Context.now`); tests move it to open a schedule
                window in seconds.
        """
        self.settings = settings
        self.specs: list[HandlerSpec] = (registry or default_registry).select(handler_ids)
        self.nc = nc
        self.state = state
        self.backend = backend
        self.store = store
        self.stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self.metrics = HandlerMetrics(metrics_registry)
        self.health_port: int | None = None
        self.now = now

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        """Run until `stop()`; raise if a root task dies."""
        async with AsyncExitStack() as stack:
            nc = self.nc
            js = nc.jetstream()
            state = self.state
            ctx = Context(
                state=state,
                backend=self.backend,
                js=js,
                log=logs.get("spinyard.handler"),
                knobs=make_knobs(self.settings),
                store=self.store,
                now=self.now,
                memo=Memo(
                    spec_ttl_s=self.settings.handlers.spec_cache_s,
                    activity_every_s=self.settings.handlers.activity_write_s,
                    epoch=lambda: nc.stats["reconnects"],  # the watch may have missed changes
                ),
            )
            if ctx.memo.spec_ttl_s > 0:  # a changed spec is dropped from memory at once
                watch = await watch_apps(state.apps.kv, ctx.memo.forget)
                stack.push_async_callback(watch.unsubscribe)
            if any(spec.kind in CLAIMERS for spec in self.specs):
                # Claims start from a pool's record as the watch last saw it. (Only where
                # claims are made: each pool write costs every watching process a message.)
                state.pools.latest = Latest()
                pools_watch = await watch_keys(state.pools.kv, POOL_KEYS, state.pools.heard)
                stack.push_async_callback(pools_watch.unsubscribe)
            await run_start_hooks(ctx, self.specs)
            consumers = [
                Consumer(js, spec, ctx, self.settings.handlers, self.stopping, self.metrics)
                for spec in self.specs
            ]
            for consumer in consumers:
                self.metrics.watch(consumer)
            tasks = [
                asyncio.create_task(consumer.run(), name=f"consumer:{consumer.spec.id}")
                for consumer in consumers
            ]
            tasks.append(
                asyncio.create_task(
                    dead_letter_exhausted(nc, js, self.stopping), name="exhausted-watcher"
                )
            )
            if self.settings.handlers.health_port is not None:
                runner = await serve_health(self, nc, consumers, tasks)
                stack.push_async_callback(runner.cleanup)
            if any(spec.kind == subjects.REAPER_TICK for spec in self.specs):
                tasks.append(
                    asyncio.create_task(
                        tick_forever(js, self.settings.reaper.interval_s, self.stopping),
                        name="reaper-ticker",
                    )
                )
            if any(spec.kind == subjects.JOB_UPDATE for spec in self.specs):
                tasks.append(
                    asyncio.create_task(
                        self.backend.watch_jobs(job_reporter(js), self.stopping), name="job-watcher"
                    )
                )
            log.info(
                "handlers_started",
                handlers=[s.id for s in self.specs],
                concurrency={c.spec.id: c.concurrency for c in consumers},
            )
            self.ready.set()
            stop_waiter = asyncio.create_task(self.stopping.wait(), name="stop-waiter")
            done, _ = await asyncio.wait([*tasks, stop_waiter], return_when=asyncio.FIRST_COMPLETED)
            self.stopping.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            stop_waiter.cancel()
            died = [
                r
                for r in results
                if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)
            ]
            log.info("handlers_stopped")
            if stop_waiter not in done and died:
                raise RuntimeError(f"a handler task died: {died[0]!r}") from died[0]
