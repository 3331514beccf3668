"""The consumer loop against a real nats-server: ack, retry, dead-letter, shutdown."""

import asyncio
import contextlib
import json
import time

import pytest
from structlog.testing import capture_logs

from dispatcher import bus, compose
from dispatcher.bus import consumer
from dispatcher.runtime import Handlers
from handlers.errors import HIDDEN, PermanentError, PublicError, Rejected, RetryableError
from handlers.ports import Backend
from handlers.registry import Registry, handler
from schemas import subjects
from schemas.codec import decode, encode
from schemas.errors import ErrorInfo
from schemas.events import PageLoad
from schemas.status import AppState, AppStatus
from tests.helpers import wait_for


class NoBackend(Backend):
    """The consumer never touches the backend; these handlers don't either."""

    name = "none"

    async def start_viz(self, *a, **k):
        raise AssertionError("unused")

    async def wait_ready(self, *a, **k):
        raise AssertionError("unused")

    def url(self, *a, **k):
        raise AssertionError("unused")

    async def stop_viz(self, *a, **k):
        raise AssertionError("unused")

    async def claim(self, *a, **k):
        raise AssertionError("unused")

    async def list_instances(self):
        return []


async def _publish(js, event, kind=subjects.PAGE_LOAD):
    await js.publish(
        subjects.event(kind, event.app), encode(event), headers={"Nats-Msg-Id": event.id}
    )


async def _dead_letters(js, kind):
    info = await js.stream_info(subjects.DEAD_STREAM)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        msg = await js.get_msg(subjects.DEAD_STREAM, seq)
        if msg.subject == subjects.dead(kind):
            out.append(msg)
    return out


@pytest.fixture
async def nats(settings):
    nc = await bus.connect(settings.nats, "test")
    yield nc
    await nc.close()


async def _run(settings, registry, nc):
    state = await compose.provision(nc.jetstream(), settings, registry.select(None))
    service = Handlers(settings, nc=nc, state=state, backend=NoBackend(), registry=registry)
    task = asyncio.create_task(service.run(), name="handlers-under-test")
    await asyncio.wait_for(service.ready.wait(), 10)
    return service, task


async def test_ack_on_success_and_log_context(settings, nats):
    registry = Registry()
    seen = []

    @handler(subjects.PAGE_LOAD, schema=PageLoad, registry=registry)
    async def ok(ctx, event):
        seen.append(event)

    service, task = await _run(settings, registry, nats)
    js = nats.jetstream()
    await _publish(js, PageLoad(app="a/b", session="s1"))
    await wait_for(lambda: seen, what="handler call")
    # WorkQueue retention removes acked messages.
    await wait_for(lambda: _stream_empty(js), what="message acked")
    service.stop()
    await task
    assert seen[0].app == "a/b"


async def _stream_empty(js):
    info = await js.stream_info(subjects.EVENTS_STREAM)
    return info.state.messages == 0


async def test_unexpected_error_retries_then_dead_letters_with_reason(settings, nats):
    registry = Registry()
    calls = []

    @handler(subjects.PAGE_LOAD, schema=PageLoad, retries=2, backoff_s=(0.05,), registry=registry)
    async def boom(ctx, event):
        calls.append(event.id)
        raise ValueError("disk on fire")

    service, task = await _run(settings, registry, nats)
    js = nats.jetstream()
    event = PageLoad(app="a/b", session="s1")
    await _publish(js, event)
    dead = await wait_for(lambda: _dead_letters(js, subjects.PAGE_LOAD), what="dead letter")
    service.stop()
    await task
    assert calls == [event.id] * 3  # first try + 2 retries
    assert len(dead) == 1
    headers = dead[0].headers
    assert "disk on fire" in headers["Spinyard-Reason"]
    assert headers["Spinyard-Attempts"] == "3"
    assert headers["Spinyard-Handler"] == "page_load"
    assert dead[0].data == encode(event)  # the event itself, unchanged


async def test_permanent_error_dead_letters_at_once_and_runs_failure_hook(settings, nats):
    registry = Registry()
    calls, hooked = [], []

    async def hook(ctx, event, error):
        hooked.append(error)

    @handler(subjects.PAGE_LOAD, schema=PageLoad, retries=5, on_failure=hook, registry=registry)
    async def nope(ctx, event):
        calls.append(1)
        raise Rejected("no such thing", code="unknown_app")

    service, task = await _run(settings, registry, nats)
    js = nats.jetstream()
    await _publish(js, PageLoad(app="a/b", session="s1"))
    dead = await wait_for(lambda: _dead_letters(js, subjects.PAGE_LOAD), what="dead letter")
    service.stop()
    await task
    assert calls == [1]
    # A public error reaches the page as it is.
    assert (hooked[0].code, hooked[0].message) == ("unknown_app", "no such thing")
    assert dead[0].headers["Spinyard-Error-Code"] == "unknown_app"


SECRET_DETAIL = "spinyard's service account may not create pods in ns-x (see the Role spinyard)"


async def test_a_non_public_error_reaches_the_page_as_internal_and_operators_in_full(
    settings, nats
):
    """Don't-retry is not show-the-browser: a permanent error that is not public gives the
    page a generic code and message; the log and the dead letter carry the detail."""
    registry = Registry()
    calls, hooked = [], []

    async def hook(ctx, event, error):
        hooked.append(error)
        status = AppStatus(app=event.app, state=AppState.FAILED, error=error)
        await ctx.publish_status(subjects.app_status(event.app), status)

    @handler(subjects.PAGE_LOAD, schema=PageLoad, retries=5, on_failure=hook, registry=registry)
    async def forbidden(ctx, event):
        calls.append(1)
        raise PermanentError(SECRET_DETAIL, code="forbidden")

    with capture_logs() as logged:
        service, task = await _run(settings, registry, nats)
        js = nats.jetstream()
        await _publish(js, PageLoad(app="a/b", session="s1"))
        dead = await wait_for(lambda: _dead_letters(js, subjects.PAGE_LOAD), what="dead letter")
        service.stop()
        await task
    assert calls == [1]  # permanent: not retried
    status = decode(
        AppStatus, (await js.get_last_msg(subjects.STATUS_STREAM, subjects.app_status("a/b"))).data
    )
    assert status.state == AppState.FAILED
    assert status.error == hooked[0] == HIDDEN
    assert status.error.code == "internal"
    assert status.error.message == "spinyard could not handle this event"
    # Operators: the dead letter and the log line have the error's own code and text.
    assert dead[0].headers["Spinyard-Error-Code"] == "forbidden"
    assert SECRET_DETAIL in dead[0].headers["Spinyard-Reason"]
    failed = [e for e in logged if e["event"] == "handler_failed"]
    assert len(failed) == 1
    assert failed[0]["code"] == "forbidden" and SECRET_DETAIL in failed[0]["error"]
    assert failed[0]["handler"] == "page_load" and failed[0]["app"] == "a/b"
    handled = [e for e in logged if e["event"] == "message_handled"]
    assert [e["outcome"] for e in handled] == ["failed"]


class Busy(RetryableError, PublicError):
    """A retryable error whose message is written for the page."""


@pytest.mark.parametrize(
    ("error", "page_sees"),
    [
        (RetryableError(SECRET_DETAIL, delay=0.05), HIDDEN),
        (ValueError(SECRET_DETAIL), HIDDEN),
        (
            Busy("the app is busy, try later", delay=0.05, code="unavailable"),
            ErrorInfo(code="unavailable", message="the app is busy, try later"),
        ),
    ],
)
async def test_after_the_last_try_the_page_sees_only_a_public_error(
    settings, nats, error, page_sees
):
    registry = Registry()
    calls, hooked = [], []

    async def hook(ctx, event, error):
        hooked.append(error)

    @handler(
        subjects.PAGE_LOAD,
        schema=PageLoad,
        retries=1,
        backoff_s=(0.05,),
        on_failure=hook,
        registry=registry,
    )
    async def flaky(ctx, event):
        calls.append(1)
        raise error

    with capture_logs() as logged:
        service, task = await _run(settings, registry, nats)
        js = nats.jetstream()
        await _publish(js, PageLoad(app="a/b", session="s1"))
        dead = await wait_for(lambda: _dead_letters(js, subjects.PAGE_LOAD), what="dead letter")
        service.stop()
        await task
    assert calls == [1, 1]
    assert hooked == [page_sees]
    reason = dead[0].headers["Spinyard-Reason"]
    assert reason.startswith("after 2 tries") and str(error) in reason
    failed = [e for e in logged if e["event"] == "handler_failed"]
    assert len(failed) == 1 and str(error) in failed[0]["error"]


async def _times_of_tries(settings, nats, ok_at: int, delay: float, **options) -> list[float]:
    """When each try of one page load ran: a handler raising RetryableError(`delay`) until
    try `ok_at`, with `options` for `@handler`; after it was acked, nothing dead-lettered."""
    registry = Registry()
    calls = []

    @handler(subjects.PAGE_LOAD, schema=PageLoad, retries=3, registry=registry, **options)
    async def flaky(ctx, event):
        calls.append(asyncio.get_running_loop().time())
        if len(calls) < ok_at:
            raise RetryableError("not yet", delay=delay)

    service, task = await _run(settings, registry, nats)
    js = nats.jetstream()
    await _publish(js, PageLoad(app="a/b", session="s1"))
    await wait_for(lambda: len(calls) == ok_at, what=f"try {ok_at}")
    await wait_for(lambda: _stream_empty(js), what="ack")
    service.stop()
    await task
    assert await _dead_letters(js, subjects.PAGE_LOAD) == []
    return calls


async def test_retryable_error_is_retried_after_its_delay(settings, nats):
    calls = await _times_of_tries(settings, nats, ok_at=2, delay=0.3)
    assert calls[1] - calls[0] >= 0.25


async def test_undecodable_message_is_dead_lettered_not_retried(settings, nats):
    registry = Registry()
    calls = []

    @handler(subjects.PAGE_LOAD, schema=PageLoad, registry=registry)
    async def never(ctx, event):
        calls.append(1)

    service, task = await _run(settings, registry, nats)
    js = nats.jetstream()
    await js.publish(subjects.event(subjects.PAGE_LOAD, "a/b"), b"\xc1 not msgpack")
    dead = await wait_for(lambda: _dead_letters(js, subjects.PAGE_LOAD), what="dead letter")
    service.stop()
    await task
    assert calls == []
    assert dead[0].headers["Spinyard-Reason"].startswith("undecodable")


async def test_shutdown_finishes_inflight_message(settings, nats):
    registry = Registry()
    started, finished = asyncio.Event(), []

    @handler(subjects.PAGE_LOAD, schema=PageLoad, registry=registry)
    async def slow(ctx, event):
        started.set()
        await asyncio.sleep(0.5)
        finished.append(event.id)

    service, task = await _run(settings, registry, nats)
    js = nats.jetstream()
    event = PageLoad(app="a/b", session="s1")
    await _publish(js, event)
    await asyncio.wait_for(started.wait(), 10)
    service.stop()
    await task
    assert finished == [event.id]
    assert await _stream_empty(js)


async def test_a_handler_slower_than_the_ack_wait_is_run_once(settings, nats):
    """While handlers run, one keep-alive task extends the deadline of each message in
    flight: messages that take three ack waits are not handed out again meanwhile."""
    settings.handlers.ack_wait_s = 0.5
    registry = Registry()
    runs = []

    @handler(subjects.PAGE_LOAD, schema=PageLoad, registry=registry)
    async def slow(ctx, event):
        runs.append(event.session)
        await asyncio.sleep(1.5)

    service, task = await _run(settings, registry, nats)
    js = nats.jetstream()
    for i in range(3):
        await _publish(js, PageLoad(app="a/b", session=f"s{i}"))
        await asyncio.sleep(0.2)  # fetched at different points of the keep-alive period
    await wait_for(lambda: _stream_empty(js), timeout=15, what="all three settled")
    service.stop()
    await task
    assert sorted(runs) == ["s0", "s1", "s2"]  # each once: none redelivered
    info = await js.consumer_info(subjects.EVENTS_STREAM, "page_load")
    assert info.num_redelivered == 0


async def test_handler_concurrency_is_bounded(settings, nats):
    registry = Registry()
    running, peak, done = [0], [0], []

    @handler(subjects.PAGE_LOAD, schema=PageLoad, concurrency=3, registry=registry)
    async def busy(ctx, event):
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await asyncio.sleep(0.05)
        running[0] -= 1
        done.append(1)

    service, task = await _run(settings, registry, nats)
    js = nats.jetstream()
    for i in range(12):
        await _publish(js, PageLoad(app="a/b", session=f"s{i}"))
    await wait_for(lambda: len(done) == 12, what="all handled")
    service.stop()
    await task
    assert peak[0] == 3


async def test_health_and_metrics_server(settings, nats):
    import aiohttp

    from tests.helpers import parse_metrics

    registry = Registry()
    calls = []
    release = asyncio.Event()

    @handler(subjects.PAGE_LOAD, schema=PageLoad, retries=1, backoff_s=(0.05,), registry=registry)
    async def sometimes(ctx, event):
        calls.append(1)
        if event.session == "slow":
            await release.wait()
        if event.session == "bad":
            raise ValueError("no")

    settings.handlers.health_port = 0
    service, task = await _run(settings, registry, nats)
    js = nats.jetstream()
    await _publish(js, PageLoad(app="a/b", session="slow"))
    await wait_for(lambda: len(calls) == 1, what="the slow message taken")
    base = f"http://127.0.0.1:{service.health_port}"
    inflight = ("spinyard_handler_inflight", frozenset({("handler", "page_load")}))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/metrics") as r:
            assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            assert parse_metrics(await r.text())[inflight] == 1
        release.set()
        await _publish(js, PageLoad(app="a/b", session="bad"))
        await wait_for(lambda: len(calls) == 3, what="1 ok + 2 tries")
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 200 and (await r.json())["ok"] is True
        scraped = await wait_for(lambda: _scrape(http, base), what="dead letter counted")
        service.stop()
        await task
    assert (
        scraped[
            (
                "spinyard_handler_messages_total",
                frozenset({("handler", "page_load"), ("outcome", "ok")}),
            )
        ]
        == 1
    )
    assert (
        scraped[
            (
                "spinyard_handler_messages_total",
                frozenset({("handler", "page_load"), ("outcome", "retried")}),
            )
        ]
        == 1
    )
    assert (
        scraped[("spinyard_handler_duration_seconds_count", frozenset({("handler", "page_load")}))]
        == 3
    )
    assert scraped[inflight] == 0


async def _scrape(http, base):
    from tests.helpers import parse_metrics

    async with http.get(f"{base}/metrics") as r:
        metrics = parse_metrics(await r.text())
    key = (
        "spinyard_handler_messages_total",
        frozenset({("handler", "page_load"), ("outcome", "dead_lettered")}),
    )
    return metrics if metrics.get(key) == 1 else None


async def test_message_whose_deliveries_all_go_unsettled_is_dead_lettered(settings, nats):
    """A consumer that never settles (as handlers that all crash) exhausts JetStream's
    deliveries; the advisory watcher of a running handler service dead-letters the event."""
    from dispatcher import bus as spinyard_bus
    from handlers.registry import HandlerSpec

    async def never(ctx, event):
        raise AssertionError("not run: the test's raw subscriber takes the message")

    crashing = HandlerSpec(
        id="page_load", kind=subjects.PAGE_LOAD, fn=never, schema=PageLoad, retries=1
    )
    js = nats.jetstream()
    settings.handlers.ack_wait_s = 0.5
    await spinyard_bus.ensure(js, settings.nats, [crashing], settings.handlers)
    registry = Registry()

    @handler(subjects.HEARTBEAT, schema=PageLoad, registry=registry)
    async def other(ctx, event):
        pass

    service, task = await _run(settings, registry, nats)
    event = PageLoad(app="a/b", session="s1")
    await _publish(js, event)
    sub = await js.pull_subscribe_bind(durable="page_load", stream=subjects.EVENTS_STREAM)
    for _ in range(crashing.max_deliver):  # all taken and dropped, as by processes that died
        (await sub.fetch(1, timeout=5))[0]

    async def pull_and_look():
        # JetStream notices a message is out of tries when it would redeliver it,
        # i.e. on a later pull, as a surviving replica would make.
        with contextlib.suppress(TimeoutError):
            assert await sub.fetch(1, timeout=0.3) == []
        return await _dead_letters(js, subjects.PAGE_LOAD)

    dead = await wait_for(pull_and_look, what="dead letter")
    await sub.unsubscribe()
    service.stop()
    await task
    assert dead[0].data == encode(event)
    assert "last try" in dead[0].headers["Spinyard-Reason"]
    assert await _stream_empty(js)


async def test_a_retryable_errors_delay_does_not_shorten_the_backoff(settings, nats):
    """A store's 1 s delay used to replace the handler's backoff, so eleven tries went by
    in 14 s; the delay is now a floor and the handler's backoff still grows."""
    calls = await _times_of_tries(settings, nats, ok_at=3, delay=0.01, backoff_s=(0.3, 0.6))
    assert calls[1] - calls[0] >= 0.25 and calls[2] - calls[1] >= 0.55


@pytest.mark.parametrize("patient", [True, False])
async def test_an_error_with_until_is_tried_past_the_retries_of_a_patient_handler(
    settings, nats, patient
):
    registry = Registry()
    calls = []
    until = time.time() + 60

    @handler(
        subjects.PAGE_LOAD,
        schema=PageLoad,
        retries=1,
        backoff_s=(0.05,),
        patient=patient,
        registry=registry,
    )
    async def waiting(ctx, event):
        calls.append(event.id)
        if len(calls) < 5:
            raise RetryableError("store away", delay=0.01, until=until)

    service, task = await _run(settings, registry, nats)
    js = nats.jetstream()
    await _publish(js, PageLoad(app="a/b", session="s1"))
    if patient:
        await wait_for(lambda: len(calls) == 5, what="fifth try")
        await wait_for(lambda: _stream_empty(js), what="ack")
        assert await _dead_letters(js, subjects.PAGE_LOAD) == []
    else:  # `until` is no licence for a handler that did not ask for it
        dead = await wait_for(lambda: _dead_letters(js, subjects.PAGE_LOAD), what="dead letter")
        assert len(dead) == 1 and len(calls) == 2
    info = await js.consumer_info(subjects.EVENTS_STREAM, "page_load")
    assert info.config.max_deliver == (-1 if patient else 3)  # tries + 1 (dispatcher.bus.requeue)
    service.stop()
    await task


async def test_a_patient_handler_gives_up_once_until_has_passed(settings, nats):
    registry = Registry()
    calls = []

    @handler(
        subjects.PAGE_LOAD,
        schema=PageLoad,
        retries=1,
        backoff_s=(0.05,),
        patient=True,
        registry=registry,
    )
    async def late(ctx, event):
        calls.append(event.id)
        raise RetryableError("store away", delay=0.01, until=time.time() - 1)

    service, task = await _run(settings, registry, nats)
    js = nats.jetstream()
    await _publish(js, PageLoad(app="a/b", session="s1"))
    dead = await wait_for(lambda: _dead_letters(js, subjects.PAGE_LOAD), what="dead letter")
    service.stop()
    await task
    assert len(dead) == 1 and len(calls) == 2  # its own retries, no more


async def test_a_backlog_is_pulled_in_batches_and_a_lone_message_is_not_held(
    settings, nats, monkeypatch
):
    """Issue 8: a batch pull waiting on an empty stream could be handed a new message
    without being ended, and nats-py's fetch then held the message until the batch filled
    or the pull expired (a page load 10 ms after another waited up to 0.96 s in 10 of 30
    tries; docs/benchmarks.md, "sporadic"). The consumer's pulls hand each message over
    as it arrives (`dispatcher.bus.pull`): here an idle consumer's pull, made to wait on
    the server for 8 s, still delivers a lone message well before that, and no other
    pull is made for it. A backlog is taken in batches of `fetch_batch`. (A stop waits
    for the pull to end: the longer it is, the longer the test.)"""
    monkeypatch.setattr(consumer, "FETCH_TIMEOUT_S", 8.0)
    registry = Registry()
    handled = []

    @handler(subjects.PAGE_LOAD, schema=PageLoad, registry=registry)
    async def ok(ctx, event):
        handled.append(event.session)

    state = await compose.provision(nats.jetstream(), settings, registry.select(None))
    pulls = []

    async def seen(msg):
        request = json.loads(msg.data)
        pulls.append((request["batch"], request["expires"]))

    spy = await nats.subscribe(
        f"$JS.API.CONSUMER.MSG.NEXT.{subjects.EVENTS_STREAM}.page_load", cb=seen
    )
    js = nats.jetstream()
    for i in range(40):  # a backlog before the handlers start
        await _publish(js, PageLoad(app="a/b", session=f"b{i}"))
    service = Handlers(settings, nc=nats, state=state, backend=NoBackend(), registry=registry)
    task = asyncio.create_task(service.run(), name="handlers-under-test")
    try:
        await wait_for(lambda: len(handled) == 40, what="the backlog handled")
        assert {batch for batch, _ in pulls} == {settings.handlers.fetch_batch}
        # Idle now: the next pull waits 8 s for up to a batch; a lone message ends
        # nothing, it is handed over at once.
        await wait_for(lambda: pulls[-1][1] > 7e9, what="the idle pull")
        idle = len(pulls)
        await _publish(js, PageLoad(app="a/b", session="alone"))
        await wait_for(lambda: "alone" in handled, timeout=4, what="the lone message handled")
        assert len(pulls) == idle  # by the pull that was waiting, not a new one
    finally:
        await spy.unsubscribe()
        service.stop()
        await task


async def _stream_messages(js):
    info = await js.stream_info(subjects.EVENTS_STREAM)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        with contextlib.suppress(Exception):
            out.append(await js.get_msg(subjects.EVENTS_STREAM, seq))
    return [m for m in out if m.data]


async def test_a_last_try_interrupted_by_a_stop_is_handed_back_not_dead_lettered(settings, nats):
    """Stopped during its only try (the grace period ran out), the event goes back to the
    stream with that try unused, and the next handler process runs it as try 1."""
    settings.handlers.shutdown_grace_s = 0.2
    registry = Registry()
    runs = []

    @handler(subjects.PAGE_LOAD, schema=PageLoad, registry=registry, retries=0)
    async def stuck(ctx, event):
        runs.append(event.id)
        await asyncio.sleep(60)

    js = nats.jetstream()
    service, task = await _run(settings, registry, nats)
    dead_before = len(await _dead_letters(js, subjects.PAGE_LOAD))
    event = PageLoad(app="a/b", session="s1")
    await _publish(js, event)
    await wait_for(lambda: runs, what="the handler runs")
    with capture_logs() as logs:
        service.stop()
        await task
    assert [e["attempt"] for e in logs if e["event"] == "message_handed_back"] == [1]
    copies = await _stream_messages(js)
    assert [decode(PageLoad, m.data).id for m in copies] == [event.id]
    assert copies[0].headers["Spinyard-Tries-Used"] == "0"

    finished = []
    registry2 = Registry()

    @handler(subjects.PAGE_LOAD, schema=PageLoad, registry=registry2, retries=0)
    async def quick(ctx, event):
        finished.append(event.id)

    with capture_logs() as logs:
        service, task = await _run(settings, registry2, nats)
        await wait_for(lambda: finished, what="the handed-back event runs")
        await wait_for(lambda: _stream_empty(js), what="and is acked")
        service.stop()
        await task
    assert finished == [event.id]
    handled = [e for e in logs if e["event"] == "message_handled"]
    assert [(e["attempt"], e["outcome"]) for e in handled] == [(1, "ok")]
    assert len(await _dead_letters(js, subjects.PAGE_LOAD)) == dead_before


async def test_a_message_arriving_as_the_stop_begins_is_handed_back_once(settings, nats):
    """The last pull may still deliver after a stop begins; such a message is handed back
    after that pull ends, not nak'ed into the same pull until its tries are gone."""
    registry = Registry()
    runs = []

    @handler(subjects.PAGE_LOAD, schema=PageLoad, registry=registry, retries=0)
    async def never(ctx, event):
        runs.append(event.id)

    js = nats.jetstream()
    service, task = await _run(settings, registry, nats)
    dead_before = len(await _dead_letters(js, subjects.PAGE_LOAD))
    await asyncio.sleep(0.2)  # the idle pull is waiting on the server
    event = PageLoad(app="a/b", session="s1")
    with capture_logs() as logs:
        service.stop()
        await _publish(js, event)  # delivered to the pull that is still open
        await task
    assert runs == []
    assert [e["event"] for e in logs if "handed_back" in e["event"]] == ["message_handed_back"]
    copies = await _stream_messages(js)
    assert [decode(PageLoad, m.data).id for m in copies] == [event.id]
    info = await js.consumer_info(subjects.EVENTS_STREAM, "page_load")
    assert info.num_ack_pending == 0
    assert len(await _dead_letters(js, subjects.PAGE_LOAD)) == dead_before
    # Leave the stream empty for the next test.
    sub = await js.pull_subscribe_bind(durable="page_load", stream=subjects.EVENTS_STREAM)
    for msg in await sub.fetch(1, timeout=5):
        await msg.ack()
    await sub.unsubscribe()


async def test_the_delivery_after_an_unsettled_last_try_is_dead_lettered_unrun(settings, nats):
    """A last try whose process died leaves one more delivery; the consumer that gets
    it dead-letters the event without running it, and the page hears `failed`."""
    from dispatcher import bus as spinyard_bus
    from handlers.registry import HandlerSpec

    settings.handlers.ack_wait_s = 0.5
    registry = Registry()
    runs, hooks = [], []

    async def failed(ctx, event, info):
        hooks.append(info.code)

    @handler(subjects.PAGE_LOAD, schema=PageLoad, registry=registry, retries=1, on_failure=failed)
    async def ok(ctx, event):
        runs.append(event.id)

    spec = registry.select(None)[0]
    assert isinstance(spec, HandlerSpec) and spec.max_deliver == spec.tries + 1
    js = nats.jetstream()
    await spinyard_bus.ensure(js, settings.nats, [spec], settings.handlers)
    dead_before = len(await _dead_letters(js, subjects.PAGE_LOAD))
    event = PageLoad(app="a/b", session="s1")
    await _publish(js, event)
    sub = await js.pull_subscribe_bind(durable="page_load", stream=subjects.EVENTS_STREAM)
    for _ in range(spec.tries):  # every try taken and never settled, as by processes that died
        await sub.fetch(1, timeout=5)
    await sub.unsubscribe()
    service, task = await _run(settings, registry, nats)
    await wait_for(lambda: _stream_empty(js), timeout=10, what="the event settled")
    service.stop()
    await task
    assert runs == []
    assert hooks == ["internal"]
    dead = await _dead_letters(js, subjects.PAGE_LOAD)
    assert len(dead) == dead_before + 1
    assert dead[-1].data == encode(event)
    assert "last try" in dead[-1].headers["Spinyard-Reason"]
    assert dead[-1].headers["Spinyard-Attempts"] == str(spec.tries)
