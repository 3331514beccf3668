"""Viz apps end to end through the handlers: real nats-server, real app processes.

Covers DESIGN.md's lifecycle rules: one deployment per shared app under
concurrent loads, per-session instances, warm pools, heartbeats that count,
each idle limit, reconcile, and a handler killed mid-message.
"""

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import msgpack
import pytest
from nats.js.errors import NotFoundError
from structlog.testing import capture_logs

from dispatcher import bus, compose
from dispatcher.backends.local.backend import LocalBackend
from dispatcher.runtime import Handlers
from handlers.deployments import SHARED, slot_key
from handlers.errors import PermanentError
from handlers.pools import PoolIndex
from handlers.registry import default_registry
from schemas import subjects
from schemas.codec import encode
from schemas.events import Heartbeat, PageLoad, PoolRefill
from schemas.spec import AppSpec, IdleLimits, Pool
from tests.helpers import ROOT, wait_for

HELLO = ROOT / "examples" / "hello"
ECHO_APP = ROOT / "tests" / "apps" / "echo_app.py"


def hello_spec(name="demo/hello", **overrides) -> AppSpec:
    base = dict(
        name=name,
        command=["{python}", "app.py"],
        workdir=str(HELLO),
        readiness_path="/healthz",
        start_timeout_s=15,
    )
    return AppSpec(**(base | overrides))


class Statuses:
    """Collects every status message published, by subject."""

    def __init__(self):
        self.by_subject: dict[str, list[dict]] = {}

    async def on_msg(self, msg):
        self.by_subject.setdefault(msg.subject, []).append(msgpack.unpackb(msg.data))

    def states(self, subject) -> list[str]:
        return [s["state"] for s in self.by_subject.get(subject, [])]

    def last(self, subject) -> dict | None:
        seen = self.by_subject.get(subject)
        return seen[-1] if seen else None


class Stack:
    def __init__(self, settings, nc, backend, statuses):
        self.settings, self.nc, self.backend, self.statuses = settings, nc, backend, statuses
        self.js = nc.jetstream()
        self.state = None
        self.service = None

    def handled(self, handler: str, outcome: str) -> float:
        """How many messages `handler` settled with `outcome` (from its metrics)."""
        labels = {"handler": handler, "outcome": outcome}
        registry = self.service.metrics.registry
        return registry.get_sample_value("spinyard_handler_messages_total", labels) or 0.0

    async def register(self, spec: AppSpec):
        await self.state.apps.put(spec.name, spec)

    async def page_load(self, app, session="s-1"):
        event = PageLoad(app=app, session=session)
        await self.js.publish(
            subjects.event(subjects.PAGE_LOAD, app),
            encode(event),
            headers={"Nats-Msg-Id": event.id},
        )
        return event

    async def heartbeat(self, app, session="s-1", **fields):
        event = Heartbeat(
            app=app, session=session, **({"visible": True, "focused": True, "idle_s": 0} | fields)
        )
        await self.js.publish(subjects.event(subjects.HEARTBEAT, app), encode(event))

    async def wait_state(self, subject, state, timeout=20.0):
        await wait_for(
            lambda: (self.statuses.last(subject) or {}).get("state") == state,
            timeout=timeout,
            what=f"{subject} -> {state}",
        )
        return self.statuses.last(subject)

    async def viz_instances(self):
        return [i for i in await self.backend.list_instances() if i.kind == "viz" and i.alive]

    async def record(self, app, slot=SHARED):
        return await self.state.deployments.get(slot_key(app, slot))


@pytest.fixture
async def stack(settings):
    async with running_stack(settings) as s:
        yield s


@contextlib.asynccontextmanager
async def running_stack(settings, handler_ids=None, backend_cls=LocalBackend, leave_running=False):
    """The handlers (all, or `handler_ids`) over the local backend; on exit every instance
    is stopped, unless `leave_running` (as a crashed or restarted stack leaves them)."""
    backend = backend_cls(settings.backend.local, settings.data_dir, "http://127.0.0.1:9999")
    await backend.setup()
    nc = await bus.connect(settings.nats, "test")
    statuses = Statuses()
    await nc.subscribe(f"{subjects.STATUS}.>", cb=statuses.on_msg)
    state = await compose.provision(nc.jetstream(), settings, default_registry.select(handler_ids))
    service = Handlers(settings, handler_ids, nc=nc, state=state, backend=backend)
    task = asyncio.create_task(service.run(), name="handlers-under-test")
    await asyncio.wait_for(service.ready.wait(), 10)
    s = Stack(settings, nc, backend, statuses)
    s.state = await bus.ensure_state(nc.jetstream(), settings.nats)
    s.service = service
    try:
        yield s
    finally:
        service.stop()
        await task
        for instance in [] if leave_running else await backend.list_instances():
            await backend.stop_viz(instance.id)
        await backend.cleanup()
        await nc.close()


async def test_page_load_starts_app_and_reports_ready(stack):
    await stack.register(hello_spec())
    await stack.page_load("demo/hello")
    subject = subjects.app_status("demo/hello")
    ready = await stack.wait_state(subject, "ready")
    assert (
        stack.statuses.states(subject)[:2] == ["pending", "starting"]
        or stack.statuses.states(subject)[0] == "starting"
    )
    assert ready["url"].startswith("http://127.0.0.1:9999/apps/demo/hello/i-")
    phases = ready["phases"]
    assert phases["requested"] <= phases["scheduled"] <= phases["started"] <= phases["ready"]
    assert phases["warm"] is False
    # The instance really answers under its prefix.
    _app, base = await stack.backend.target(ready["instance"])
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/apps/demo/hello/{ready['instance']}/") as resp:
            assert resp.status == 200
            assert ready["instance"] in await resp.text()


async def test_second_page_load_gets_ready_at_once_from_same_instance(stack):
    await stack.register(hello_spec())
    await stack.page_load("demo/hello")
    subject = subjects.app_status("demo/hello")
    first = await stack.wait_state(subject, "ready")
    count = len(stack.statuses.by_subject[subject])
    await stack.page_load("demo/hello", session="s-2")
    await wait_for(lambda: len(stack.statuses.by_subject[subject]) > count, what="second answer")
    second = stack.statuses.last(subject)
    assert second["state"] == "ready" and second["instance"] == first["instance"]


async def test_twenty_concurrent_page_loads_make_one_instance(stack):
    await stack.register(hello_spec())
    await asyncio.gather(*(stack.page_load("demo/hello", session=f"s-{i}") for i in range(20)))
    subject = subjects.app_status("demo/hello")
    await stack.wait_state(subject, "ready")
    # Every page load has been answered (20 answers at least, beyond starting/pending).
    await wait_for(lambda: len(stack.statuses.by_subject[subject]) >= 20, what="20 answers")
    instances = await stack.viz_instances()
    assert len(instances) == 1
    assert {s["instance"] for s in stack.statuses.by_subject[subject]} == {instances[0].id}


async def test_per_session_apps_get_one_instance_per_session(stack):
    await stack.register(hello_spec(name="demo/class", sharing="per_session"))
    await stack.page_load("demo/class", session="alice")
    await stack.page_load("demo/class", session="bob")
    a = await stack.wait_state(subjects.app_status("demo/class", "alice"), "ready")
    b = await stack.wait_state(subjects.app_status("demo/class", "bob"), "ready")
    assert a["instance"] != b["instance"]
    assert a["session"] == "alice" and b["session"] == "bob"
    assert len(await stack.viz_instances()) == 2


async def test_failed_start_reports_failed_with_reason(stack):
    await stack.register(
        hello_spec(name="demo/broken", command=["{python}", "-c", "raise SystemExit(3)"])
    )
    await stack.page_load("demo/broken")
    failed = await stack.wait_state(subjects.app_status("demo/broken"), "failed")
    assert failed["error"]["code"] == "start_failed"
    assert await stack.viz_instances() == []


async def test_an_app_that_ignores_its_base_path_fails_with_the_probe_answer(stack):
    """Started without its prefix flag, the app answers 404 on every page: not ready, so
    the page reads `failed` with the probe's last answer and the app's log tail."""
    command = ["{python}", str(ECHO_APP), "--port", "{port}"]  # no --prefix {prefix}
    await stack.register(hello_spec(name="demo/noprefix", command=command, start_timeout_s=2))
    subject = subjects.app_status("demo/noprefix")
    with capture_logs() as logged:
        await stack.page_load("demo/noprefix")
        failed = await stack.wait_state(subject, "failed")
    assert "ready" not in stack.statuses.states(subject)
    assert failed["error"]["code"] == "start_timeout"
    assert failed["error"]["message"] == (  # the time left of 2 s, in whole seconds
        "the app did not become ready within 2 s: last answer to /healthz: 404 Not Found"
    )
    assert "GET /apps/demo/noprefix/" in failed["log_tail"]  # the app's own log: the 404s
    line = next(e for e in logged if e["event"] == "viz_start_failed")
    assert line["log_tail"] == failed["log_tail"]
    assert await stack.viz_instances() == []


async def test_page_load_of_unknown_app_fails_and_is_dead_lettered(stack):
    await stack.page_load("nobody/nothing")
    failed = await stack.wait_state(subjects.app_status("nobody/nothing"), "failed")
    assert failed["error"]["code"] == "unknown_app"
    info = await wait_for(lambda: _dead_count(stack.js), what="dead letter")
    assert info == 1


async def _dead_count(js):
    return (await js.stream_info(subjects.DEAD_STREAM)).state.messages


async def test_counted_heartbeats_keep_app_alive_and_ignored_ones_do_not(stack):
    idle = IdleLimits(
        since_heartbeat_s=1.5, since_page_load_s=3600, max_lifetime_s=3600, input_window_s=60
    )
    await stack.register(hello_spec(idle=idle))
    await stack.page_load("demo/hello")
    subject = subjects.app_status("demo/hello")
    await stack.wait_state(subject, "ready")
    # Counted heartbeats for 3 s, twice the idle limit: still there.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        await stack.heartbeat("demo/hello")
        await asyncio.sleep(0.3)
    assert stack.statuses.last(subject)["state"] == "ready"
    assert len(await stack.viz_instances()) == 1
    # Hidden, unfocused and idle-viewer heartbeats don't count: reaped.
    for _ in range(8):
        await stack.heartbeat("demo/hello", visible=False)
        await stack.heartbeat("demo/hello", focused=False)
        await stack.heartbeat("demo/hello", idle_s=120)
        await asyncio.sleep(0.3)
        if stack.statuses.last(subject)["state"] == "stopped":
            break
    stopped = await stack.wait_state(subject, "stopped", timeout=10)
    assert stopped["reason"] == "idle_heartbeat"
    assert "stopping" in stack.statuses.states(subject)
    await wait_for(lambda: _none_alive(stack), what="instance gone")
    assert await stack.record("demo/hello") is None


async def _none_alive(stack):
    return await stack.viz_instances() == []


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        (dict(since_page_load_s=1.0), "idle_page_load"),
        (dict(max_lifetime_s=1.0), "max_lifetime"),
    ],
)
async def test_each_hard_limit_reaps_despite_heartbeats(stack, limits, reason):
    idle = IdleLimits(
        **({"since_heartbeat_s": 3600, "since_page_load_s": 3600, "max_lifetime_s": 3600} | limits)
    )
    await stack.register(hello_spec(idle=idle))
    await stack.page_load("demo/hello")
    subject = subjects.app_status("demo/hello")
    await stack.wait_state(subject, "ready")
    for _ in range(40):
        await stack.heartbeat("demo/hello")
        if reason == "max_lifetime":
            await stack.page_load("demo/hello", session="other")  # loads don't save it either
        if stack.statuses.last(subject)["state"] == "stopped":
            break
        await asyncio.sleep(0.2)
    stopped = await stack.wait_state(subject, "stopped", timeout=5)
    assert stopped["reason"] == reason


async def test_warm_pool_is_filled_claimed_and_refilled(stack):
    await stack.register(hello_spec(name="demo/pooled", pool=Pool(size=2)))

    async def warm():
        index = await stack.state.pools.get("demo/pooled")
        return [m.instance for m in index.warm] if index else []

    filled = await wait_for(lambda: _len_is(warm, 2), timeout=30, what="pool of 2 warm")
    await stack.page_load("demo/pooled")
    ready = await stack.wait_state(subjects.app_status("demo/pooled"), "ready")
    assert ready["phases"]["warm"] is True
    assert ready["instance"] in filled
    # The claimed instance is no longer pooled, and the pool is refilled to 2.
    instances = {i.id: i for i in await stack.viz_instances()}
    assert instances[ready["instance"]].pooled is False
    refilled = await wait_for(lambda: _len_is(warm, 2), timeout=30, what="pool refilled")
    assert ready["instance"] not in refilled
    assert len(await stack.viz_instances()) == 3


async def test_a_pool_refill_that_fails_or_lost_its_place_leaves_nothing_reserved(settings):
    """A refill whose instance cannot start gives its place in the pool back (the reaper
    asks again later), and one whose place is gone starts nothing."""
    async with running_stack(settings, ["pool_refill"]) as stack:  # no reaper: no new asks
        broken = hello_spec(
            name="demo/brokenpool",
            pool=Pool(size=1),
            command=["{python}", "-c", "raise SystemExit(3)"],
        )
        await stack.register(broken)
        failing, unreserved = "i-00000000000000f1", "i-00000000000000f2"
        await stack.state.pools.put(broken.name, PoolIndex(starting={failing: time.time()}))
        subject = subjects.event(subjects.POOL_REFILL, broken.name)
        for instance in (failing, unreserved):
            event = PoolRefill(app=broken.name, instance=instance)
            await stack.nc.jetstream().publish(subject, encode(event))

        async def given_back() -> bool:
            index = await stack.state.pools.get(broken.name)
            return index is not None and not index.starting and not index.warm

        await wait_for(given_back, timeout=15, what="the failed refill's place given back")
        await wait_for(lambda: _none_alive(stack), timeout=10, what="nothing left running")
        assert not (settings.data_dir / "local" / "instances" / f"{unreserved}.json").exists()


async def test_a_pool_refill_delivered_again_after_it_listed_its_instance_leaves_it_warm(
    settings,
):
    """A refill whose handler died after listing its instance warm but before the ack is
    delivered again: the instance, waiting in the pool, stays there and keeps running."""
    async with running_stack(settings, ["pool_refill"]) as stack:  # no reaper: no new asks
        spec = hello_spec(name="demo/redelivered", pool=Pool(size=1))
        await stack.register(spec)
        instance = "i-00000000000000e1"
        await stack.state.pools.put(spec.name, PoolIndex(starting={instance: time.time()}))
        subject = subjects.event(subjects.POOL_REFILL, spec.name)
        event = PoolRefill(app=spec.name, instance=instance)
        await stack.js.publish(subject, encode(event))

        async def warm() -> list[str]:
            index = await stack.state.pools.get(spec.name)
            return [m.instance for m in index.warm] if index else []

        await wait_for(lambda: _len_is(warm, 1), timeout=30, what="the instance listed warm")
        again = await stack.js.publish(subject, encode(event))  # the same event, once more

        async def handled() -> bool:
            info = await stack.js.consumer_info(subjects.EVENTS_STREAM, subjects.POOL_REFILL)
            return info.ack_floor.stream_seq >= again.seq

        await wait_for(handled, timeout=15, what="the second delivery handled")
        assert await warm() == [instance]
        assert [i.id for i in await stack.viz_instances()] == [instance]
        assert stack.handled("pool_refill", "ok") == 2


async def _len_is(fn, n):
    value = await fn()
    return value if len(value) == n else None


async def test_reconcile_stops_orphans_and_fails_records_without_instance(stack):
    spec = hello_spec()
    await stack.register(spec)
    # An instance no record names: stopped after the grace period.
    await stack.backend.start_viz("i-orphan000000001", spec)
    await stack.backend.wait_ready("i-orphan000000001", spec, 10)
    # A ready deployment whose process dies behind spinyard's back.
    await stack.page_load("demo/hello")
    subject = subjects.app_status("demo/hello")
    ready = await stack.wait_state(subject, "ready")
    _, base = await stack.backend.target(ready["instance"])
    pid = _pid_listening(base)
    os.kill(pid, signal.SIGKILL)
    failed = await stack.wait_state(subject, "failed")
    assert failed["error"]["code"] == "instance_lost"
    await wait_for(lambda: _none_alive(stack), what="orphan stopped")


def _pid_listening(base: str) -> int:
    port = base.rsplit(":", 1)[1]
    out = subprocess.run(["fuser", f"{port}/tcp"], capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        return int(out.stdout.split()[0])
    # Fall back to /proc: find the socket inode's owner.
    inode = None
    hexport = f"{int(port):04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[1].endswith(f":{hexport}") and parts[3] == "0A":
            inode = parts[9]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) == f"socket:[{inode}]":
                    return int(proc.name)
        except OSError:
            continue
    raise AssertionError(f"nothing listens on {base}")


async def test_handler_killed_mid_start_resumes_and_starts_once(settings):
    """A page_load handler process is SIGKILLed while the app starts; its
    redelivered message resumes the same deployment, and one instance runs."""
    others = [h for h in ("heartbeat", "reaper_tick", "pool_refill")]
    async with running_stack(settings, others) as stack:
        slow = hello_spec(
            name="demo/slow", command=["sh", "-c", 'sleep 1.5; exec "$0" app.py', "{python}"]
        )
        await stack.register(slow)
        env = os.environ | {
            "SPINYARD_NATS__URL": settings.nats.url,
            "SPINYARD_DATA_DIR": str(settings.data_dir),
            "SPINYARD_HANDLERS__ACK_WAIT_S": "1.0",
            "SPINYARD_GATEWAY__PUBLIC_URL": "http://127.0.0.1:9999",
            "SPINYARD_LOG_LEVEL": "warning",
        }
        argv = [sys.executable, "-m", "dispatcher.cli", "handlers", "page_load"]
        first = subprocess.Popen(argv, env=env)
        try:
            await wait_for(lambda: _consumer_bound(stack.js), what="first handler up")
            await stack.page_load("demo/slow")
            starting = await wait_for(
                lambda: _record_in(stack, "demo/slow", "starting"), what="start under way"
            )
            await wait_for(lambda: _alive_count(stack, 1), what="app process spawned")
            first.send_signal(signal.SIGKILL)
            first.wait(5)
            second = subprocess.Popen(argv, env=env)
            try:
                ready = await stack.wait_state(
                    subjects.app_status("demo/slow"), "ready", timeout=30
                )
            finally:
                second.send_signal(signal.SIGTERM)
                second.wait(15)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        assert ready["instance"] == starting.instance
        instances = await stack.viz_instances()
        assert [i.id for i in instances] == [starting.instance]


async def _consumer_bound(js):
    try:
        info = await js.consumer_info(subjects.EVENTS_STREAM, "page_load")
    except NotFoundError:  # the subprocess has not created it yet
        return False
    return info.num_waiting > 0


async def _record_in(stack, app, state):
    record = await stack.record(app)
    return record if record and record.state == state else None


async def _alive_count(stack, n):
    return len(await stack.viz_instances()) == n


class ObservingBackend(LocalBackend):
    """The local backend, reporting pod-like times of its own as Kubernetes does."""

    def phases(self, instance_id):
        return {"scheduled": 1000.0, "started": 1001.0, "image_pulled": 1000.5}


async def test_times_the_backend_observed_go_into_the_status(settings):
    async with running_stack(settings, backend_cls=ObservingBackend) as stack:
        await stack.register(hello_spec())
        await stack.page_load("demo/hello")
        ready = await stack.wait_state(subjects.app_status("demo/hello"), "ready")
    phases = ready["phases"]
    assert (phases["scheduled"], phases["started"], phases["image_pulled"]) == (
        1000.0,
        1001.0,
        1000.5,
    )
    assert phases["ready"] > phases["started"]  # the handler's own time, none observed


FORBIDDEN = "spinyard's service account may not create deployments in apps-ns (see the Role)"


class ForbiddenBackend(LocalBackend):
    """A backend whose cluster refuses spinyard, as a Kubernetes 403 does."""

    async def start_viz(self, instance_id, spec, *, pooled=False):
        raise PermanentError(FORBIDDEN, code="forbidden")


async def test_a_refusal_meant_for_operators_never_reaches_the_page(settings):
    with capture_logs() as logged:
        async with running_stack(settings, backend_cls=ForbiddenBackend) as stack:
            await stack.register(hello_spec())
            await stack.page_load("demo/hello")
            subject = subjects.app_status("demo/hello")
            failed = await stack.wait_state(subject, "failed")
            dead = await wait_for(lambda: _dead_letter(stack.js), what="dead letter")
    assert failed["error"] == {
        "code": "internal",
        "message": "spinyard could not handle this event",
    }
    assert not any("service account" in repr(s) for s in stack.statuses.by_subject[subject])
    assert dead.headers["Spinyard-Error-Code"] == "forbidden"
    assert FORBIDDEN in dead.headers["Spinyard-Reason"]
    assert any(
        e["event"] == "handler_failed" and FORBIDDEN in e["error"] and e["app"] == "demo/hello"
        for e in logged
    )


async def _dead_letter(js):
    with contextlib.suppress(NotFoundError):
        return await js.get_last_msg(subjects.DEAD_STREAM, subjects.dead(subjects.PAGE_LOAD))
    return None
