"""The consumer loop: pull one handler's events, run them, settle each message.

Each handler has one durable pull consumer shared by all its replicas. A
replica keeps at most `concurrency` messages in flight. Every message ends
in exactly one of: ack (done), nak with delay (try again), or dead-letter
then term (no more tries). While a handler runs, the message's ack deadline
is extended, so a slow start-up is not redelivered to another replica; if
the process dies, the deadline lapses and another replica takes it over.

What a page reads of a failure and what operators read are kept apart: the
failure hook (which publishes the `failed` status) gets the error's own code
and message only for a `PublicError`, else `internal` / "spinyard could not
handle this event"; the full error goes to the `handler_failed` log line and
the dead letter's reason.

The loop outlives the bus going away: a fetch that fails for a transient
reason (`connect.transient`: a reconnect, a leader election, a lost node)
is logged, marks the consumer unhealthy (`/healthz` answers 503) and is
tried again after a short backoff; the first fetch that works again marks
it healthy. Only an error that is not transient ends the loop.
"""

import asyncio
import contextlib
import time

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel, ValidationError
from structlog.typing import FilteringBoundLogger

from dispatcher import logs
from dispatcher.bus import deadletter, requeue
from dispatcher.bus.connect import transient
from dispatcher.bus.pull import Puller
from dispatcher.metrics import BUCKETS, new_registry
from dispatcher.settings import HandlerSettings
from handlers.context import Context
from handlers.errors import PermanentError, RetryableError, SpinyardError, public_info
from handlers.registry import HandlerSpec
from schemas import errors as codes
from schemas import subjects
from schemas.codec import DecodeError, decode

FETCH_TIMEOUT_S = 1.0  # long-poll length; also bounds how fast a stop is noticed
DRAIN_TIMEOUT_S = 0.1  # a batch pull taken only while a backlog is known (see `run`)
FETCH_BACKOFF_S = (0.05, 0.1, 0.2, 0.5, 1.0)  # pauses after failed fetches in a row


class Unsettled(SpinyardError):
    """A delivery came after the last try: that try's process died or stalled unsettled."""


class HandlerMetrics:
    """Counts and times handled messages, per handler and outcome, on a Prometheus registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """
        Args:
            registry: where the metrics are registered; a new one if None.
        """
        self.registry = registry if registry is not None else new_registry()
        self.handled = Counter(
            "spinyard_handler_messages",  # exposed as spinyard_handler_messages_total
            "Messages settled, by handler and outcome"
            " (ok, retried, failed, dead_lettered, cancelled).",
            ["handler", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "spinyard_handler_duration_seconds",
            "Time from fetch to settling a message.",
            ["handler"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.inflight = Gauge(
            "spinyard_handler_inflight",
            "Messages being handled now.",
            ["handler"],
            registry=self.registry,
        )
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    def observe(self, handler: str, outcome: str, seconds: float) -> None:
        key = (handler, outcome)
        children = self._children.get(key)
        if children is None:  # looked up once per handler and outcome, not per message
            children = self._children[key] = (
                self.handled.labels(handler=handler, outcome=outcome),
                self.duration.labels(handler=handler),
            )
        children[0].inc()
        children[1].observe(seconds)

    def watch(self, consumer: "Consumer") -> None:
        """Report `consumer`'s in-flight messages, read at each scrape."""
        tasks = consumer.inflight
        self.inflight.labels(handler=consumer.spec.id).set_function(lambda: len(tasks))


class Consumer:
    """Runs one handler's consumer loop until `stopping` is set."""

    def __init__(
        self,
        js: JetStreamContext,
        spec: HandlerSpec,
        ctx: Context,
        settings: HandlerSettings,
        stopping: asyncio.Event,
        metrics: "HandlerMetrics | None" = None,
    ):
        self.js = js
        self.metrics = metrics
        self.spec = spec
        self.ctx = ctx
        self.settings = settings
        self.stopping = stopping
        self.concurrency = settings.concurrency.get(spec.id, spec.concurrency)
        self.log = logs.get("spinyard.consumer", handler=spec.id)
        self.inflight: set[asyncio.Task] = set()
        self._working: dict[int, tuple[Msg, float]] = {}  # id(msg): (msg, when it was fetched)
        self._parked: list[Msg] = []  # delivered while stopping: handed back once pulls end
        self.healthy = True  # False while fetching fails (the bus is away)
        self._failures = 0  # failed fetches in a row
        self._failing_since = 0.0

    async def run(self) -> None:
        puller = Puller(self.js, subjects.EVENTS_STREAM, self.spec.id, self._start)
        await puller.start()
        self.log.debug("consumer_started", concurrency=self.concurrency)  # (handlers_started)
        # The loop asks for as many messages as it has room for (up to `fetch_batch`) and
        # `Puller` hands each over as it arrives, so a lone message is not held until the
        # batch fills (issue 8: nats-py's fetch did that, and the loop asked for one at a
        # time while idle). Under steady traffic a one-message pull cost a pull request
        # per event (docs/benchmarks.md, "`spinyard up`: handling that keeps up"). Idle,
        # a pull waits FETCH_TIMEOUT_S on the server; while the last message said more
        # were waiting (`num_pending`), DRAIN_TIMEOUT_S, so a pull that meets an emptied
        # backlog (another replica took it) ends soon and the next asks for the room then.
        backlog = False
        keep_alive = asyncio.create_task(self._keep_alive(), name=f"{self.spec.id}-keepalive")
        try:
            while not self.stopping.is_set():
                free = self.concurrency - len(self.inflight)
                if free <= 0:
                    await asyncio.wait(self.inflight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                batch = min(free, self.settings.fetch_batch)
                try:
                    got = await puller.pull(batch, DRAIN_TIMEOUT_S if backlog else FETCH_TIMEOUT_S)
                except TimeoutError:  # no answer at all: as a pull that found nothing
                    self._fetch_worked()  # (a consumer without a leader answers 503 instead)
                    backlog = False
                    continue
                except Exception as exc:
                    if not transient(exc):
                        raise
                    if not self.stopping.is_set():  # (stopping: the connection may be draining)
                        await self._fetch_failed(exc)
                    continue
                self._fetch_worked()
                backlog = got > 0 and puller.num_pending > 0
        finally:
            # Unsubscribe before the connection drains, or drain waits on the inbox. The
            # last pull has ended, so the copies handed back now cannot come back to it.
            with contextlib.suppress(Exception):
                await puller.stop()
            parked, self._parked = self._parked, []
            await asyncio.gather(*(self._hand_back(msg) for msg in parked))
            await self._finish_inflight()
            keep_alive.cancel()
            self.log.info("consumer_stopped")

    def _start(self, msg: Msg) -> None:
        """Handle a delivered message in a task of its own (park it if stopping).

        A message that arrives on the last pull after a stop began is handed
        back once that pull has ended, not nak'ed at once: a nak'ed message
        would be redelivered to the same pull and use up its tries in a blink.
        """
        if self.stopping.is_set():
            self._parked.append(msg)
            return
        seq = msg.metadata.sequence.stream
        task = asyncio.create_task(self._handle(msg), name=f"{self.spec.id}#{seq}")
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    async def _fetch_failed(self, exc: Exception) -> None:
        """Mark the consumer unhealthy, say so, and pause before the next fetch (or a stop)."""
        now = asyncio.get_running_loop().time()
        if self.healthy:
            self.healthy, self._failing_since = False, now
        pause = FETCH_BACKOFF_S[min(self._failures, len(FETCH_BACKOFF_S) - 1)]
        self._failures += 1
        self.log.warning(
            "fetch_failed",
            error=repr(exc),
            failures=self._failures,
            failing_s=round(now - self._failing_since, 2),
            retry_in_s=pause,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), pause)

    def _fetch_worked(self) -> None:
        if not self.healthy:
            failing_s = asyncio.get_running_loop().time() - self._failing_since
            self.log.info("fetch_recovered", failures=self._failures, failing_s=round(failing_s, 2))
        self.healthy, self._failures = True, 0

    async def _finish_inflight(self) -> None:
        if not self.inflight:
            return
        _, pending = await asyncio.wait(self.inflight, timeout=self.settings.shutdown_grace_s)
        for task in pending:
            task.cancel()  # _handle hands the message back on cancellation
        if pending:
            await asyncio.wait(pending)
            self.log.warning("inflight_cancelled", count=len(pending))

    async def _keep_alive(self) -> None:
        """Extend the ack deadline of every message handled for longer than a third of it.

        One task for all the consumer's messages, waking every sixth of the ack
        wait: a message's deadline is first extended within half of it.
        """
        period = max(self.settings.ack_wait_s / 3, 0.1)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(period / 2)
            due = loop.time() - period
            for msg, fetched in list(self._working.values()):
                if fetched > due:
                    continue
                try:
                    await msg.in_progress()
                except Exception as exc:  # the bus is away: try again next period
                    self.log.debug("keep_alive_failed", error=repr(exc))

    async def _handle(self, msg: Msg) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        attempt = requeue.attempt(msg)
        try:
            event = decode(self.spec.schema, msg.data)
        except (DecodeError, ValidationError) as exc:
            await self._dead_letter(msg, codes.INVALID_EVENT, f"undecodable: {exc}"[:1000], attempt)
            await msg.term()
            self.log.warning(
                "message_dead_lettered", subject=msg.subject, attempt=attempt, reason="undecodable"
            )
            return
        bound = {"event_id": event.id}
        for field in ("app", "job_id", "session"):
            value = getattr(event, field, None)
            if value:
                bound[field] = value
        log = self.log.bind(subject=msg.subject, attempt=attempt, **bound)
        ctx = self.ctx.bind(handler=self.spec.id, **bound)
        self._working[id(msg)] = (msg, started)  # its ack deadline is extended meanwhile
        outcome = "ok"
        try:
            if attempt > self.spec.tries and not self.spec.patient:
                # The delivery after the last try: that try was never settled.
                outcome = "dead_lettered"
                unsettled = Unsettled(deadletter.UNSETTLED)
                await self._give_up(ctx, log, msg, event, unsettled, attempt - 1)
                return
            await self._call(ctx, event, log)
        except asyncio.CancelledError:
            outcome = "cancelled"
            await self._hand_back(msg)
            raise
        except PermanentError as exc:
            outcome = "failed"
            await self._give_up(ctx, log, msg, event, exc, attempt)
        except RetryableError as exc:
            # The error's delay is a floor: it never shortens the handler's growing backoff.
            delay = max(exc.delay, self.spec.backoff(attempt))
            outcome = await self._retry_or_give_up(ctx, log, msg, event, exc, delay, attempt)
        except Exception as exc:
            log.error("handler_raised", error=repr(exc), exc_info=True)
            outcome = await self._retry_or_give_up(
                ctx, log, msg, event, exc, self.spec.backoff(attempt), attempt
            )
        else:
            # A plain publish (no round trip): if it is lost, the message is redelivered
            # after ack_wait and handled again, which every handler allows (idempotent).
            await msg.ack()
        finally:
            del self._working[id(msg)]
            seconds = loop.time() - started
            if self.metrics is not None:
                self.metrics.observe(self.spec.id, outcome, seconds)
            quiet = self.spec.routine and outcome == "ok"
            (log.debug if quiet else log.info)(
                "message_handled", outcome=outcome, duration_ms=round(seconds * 1000, 2)
            )

    async def _call(self, ctx: Context, event: BaseModel, log: FilteringBoundLogger) -> None:
        """Run the handler on `event` (each run within its timeout).

        A run that fails because the bus is away (`transient`) is run again on
        the same delivery, its ack deadline kept extended, for up to
        `handlers.bus_retry_s`: a lost cluster node or a leader election does
        not use up the event's tries. (Handlers are idempotent: a redelivery
        runs them again too.)
        """
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.settings.bus_retry_s
        runs = 0
        while True:
            runs += 1
            try:
                async with asyncio.timeout(self.spec.timeout_s) as limit:
                    await self.spec.fn(ctx, event)
                return
            except Exception as exc:
                if (
                    limit.expired()
                    or not transient(exc)
                    or self.stopping.is_set()
                    or loop.time() >= give_up_at
                ):
                    raise
                pause = FETCH_BACKOFF_S[min(runs, len(FETCH_BACKOFF_S)) - 1]
                log.warning("handler_bus_unavailable", error=repr(exc), runs=runs, retry_in_s=pause)
                await asyncio.sleep(pause)

    async def _retry_or_give_up(
        self,
        ctx: Context,
        log: FilteringBoundLogger,
        msg: Msg,
        event: BaseModel,
        exc: Exception,
        delay: float,
        attempt: int,
    ) -> str:
        """Nak `msg` to be tried again after `delay`, or give up after the last try.

        A patient handler's `RetryableError` with `until` has tries until then.
        """
        if self.stopping.is_set() and transient(exc):  # the bus went as the process stops
            await self._hand_back(msg)
            return "cancelled"
        until = getattr(exc, "until", None) if self.spec.patient else None
        if attempt < self.spec.tries or (until is not None and time.time() < until):
            await msg.nak(delay=delay)
            return "retried"
        await self._give_up(ctx, log, msg, event, exc, attempt)
        return "dead_lettered"

    async def _give_up(
        self,
        ctx: Context,
        log: FilteringBoundLogger,
        msg: Msg,
        event: BaseModel,
        exc: Exception,
        attempt: int,
    ) -> None:
        """Fail `msg` for good: the page hears what it may, operators get the detail.

        The failure hook (the page's `failed` status) gets `exc`'s code and
        message only if it is a `PublicError`; the log line and the dead
        letter carry the error's own code and full text.
        """
        code = exc.code if isinstance(exc, SpinyardError) else codes.INTERNAL
        detail = f"{code}: {exc.message}" if isinstance(exc, SpinyardError) else repr(exc)
        if attempt > 1:
            detail = f"after {attempt} tries: {detail}"
        log.warning("handler_failed", code=code, error=detail, error_type=type(exc).__name__)
        if self.spec.on_failure is not None:
            try:
                await self.spec.on_failure(ctx, event, public_info(exc))
            except Exception as hook_exc:
                log.error("failure_hook_raised", error=repr(hook_exc))
        await self._dead_letter(msg, code, detail, attempt)
        await msg.term()

    async def _hand_back(self, msg: Msg) -> None:
        """Return `msg` to the stream, its try unused (`requeue`), or nak it if that fails."""
        attempt = requeue.attempt(msg)
        kept = await requeue.hand_back(self.js, msg, attempt)
        (self.log.info if kept else self.log.warning)(
            "message_handed_back" if kept else "message_nak_on_stop",
            subject=msg.subject,
            attempt=attempt,
        )

    async def _dead_letter(self, msg: Msg, code: str, reason: str, attempt: int) -> None:
        letter = deadletter.headers(self.spec.id, msg.subject, code, reason, attempt)
        await self.js.publish(subjects.dead(self.spec.kind), msg.data, headers=letter)
