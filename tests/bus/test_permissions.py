"""NATS roles from dispatcher.bus.permissions, checked against a real nats-server.

Each test starts a nats-server with `server_config(...)` and connects as a
role with nats-py. An allowed operation must succeed end to end (a
JetStream ack, a KV revision, a fetched message); a forbidden one must be
refused by the server with a permissions violation, which nats-py reports
to `error_cb` at once, so nothing here waits on a request timeout.
"""

import asyncio
import contextlib
from collections.abc import Awaitable
from dataclasses import dataclass

import msgpack
import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, StreamConfig
from pydantic import BaseModel, SecretStr

from dispatcher import bus, compose
from dispatcher.bus import permissions
from dispatcher.embedded.natsserver import NatsServer
from dispatcher.settings import HandlerSettings, NatsSettings, Settings
from handlers.registry import HandlerSpec, default_registry
from handlers.state import Records
from schemas import subjects
from tests.helpers import ROOT, wait_for

# A `$` and a space: both must survive the quoting in server_config.
PASSWORDS = {role: f"pw {role} $x-1" for role in permissions.ROLES}


class _Event(BaseModel):
    pass


class Probe(BaseModel):
    """A record any bucket can hold: the scan only has to decode it."""

    n: int


async def _noop(ctx, event) -> None:
    return None


SPECS = [HandlerSpec(id=kind, kind=kind, fn=_noop, schema=_Event) for kind in subjects.KINDS]


@dataclass
class Conn:
    nc: Client
    js: JetStreamContext
    errors: asyncio.Queue


@pytest.fixture
def server(tmp_path):
    srv = NatsServer(tmp_path / "nats", config=permissions.server_config(PASSWORDS)).start()
    yield srv
    srv.stop()


@pytest.fixture
async def connect(server):
    """`await connect(role)` gives a connection as that role; all are closed at the end."""
    opened: list[Client] = []

    async def _connect(role: str) -> Conn:
        errors: asyncio.Queue = asyncio.Queue()

        async def on_error(err: Exception) -> None:
            errors.put_nowait(err)

        nc = await nats.connect(
            server.url,
            user=role,
            password=PASSWORDS[role],
            error_cb=on_error,
            allow_reconnect=False,
            connect_timeout=5,
        )
        opened.append(nc)
        return Conn(nc, nc.jetstream(timeout=5), errors)

    yield _connect
    for nc in opened:
        await nc.close()


async def set_up(conn: Conn) -> None:
    """What every handler does at start: streams, buckets, one durable consumer per kind."""
    await bus.ensure(conn.js, NatsSettings(), SPECS, HandlerSettings())


async def assert_denied(conn: Conn, action: Awaitable, subject: str, kind: str = "publish") -> None:
    """`action` must be refused with a permissions violation for `kind` (publish|subscription)."""
    task = asyncio.ensure_future(action)
    try:
        err = await asyncio.wait_for(conn.errors.get(), timeout=5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # nats-py lower-cases the server's message.
    assert f'permissions violation for {kind} to "{subject.lower()}"' in str(err), err


async def subscribe_and_flush(conn: Conn, subject: str) -> None:
    await conn.nc.subscribe(subject)
    await conn.nc.flush()


# --- the lists themselves -------------------------------------------------------------


def test_every_role_has_allow_lists_and_only_admin_has_everything():
    for role in permissions.ROLES:
        perms = permissions.permissions(role)
        assert set(perms) == {"publish", "subscribe"}
        assert all(set(p) == {"allow"} and p["allow"] for p in perms.values())
        has_all = any(">" in p["allow"] for p in perms.values())
        assert has_all == (role == permissions.ADMIN), role


def test_gateway_publishes_only_browser_kinds():
    published_events = [
        s
        for s in permissions.permissions(permissions.GATEWAY)["publish"]["allow"]
        if s.startswith(subjects.EVENTS)
    ]
    assert published_events == [f"{subjects.EVENTS}.{k}.>" for k in permissions.BROWSER_KINDS]
    assert subjects.REAPER_TICK not in permissions.BROWSER_KINDS


def test_unknown_role_and_bad_passwords_are_refused():
    with pytest.raises(ValueError, match="unknown NATS role"):
        permissions.permissions("root")
    with pytest.raises(ValueError, match="missing"):
        permissions.server_config({"admin": "x"})
    with pytest.raises(ValueError, match="unknown"):
        permissions.server_config({**PASSWORDS, "root": "x"})
    for bad in ('a"b', "a\\b", "a\nb", ""):
        with pytest.raises(ValueError, match="NATS password"):
            permissions.server_config({**PASSWORDS, "gateway": bad})


def test_k8s_auth_conf_is_generated_from_the_permissions_module():
    committed = (ROOT / "k8s/base/nats/auth.conf").read_text()
    assert committed == permissions.k8s_config(), (
        "k8s/base/nats/auth.conf is stale; regenerate it:"
        " python -m dispatcher.bus.permissions --k8s > k8s/base/nats/auth.conf"
    )

    # Same users and permission lines as the embedded server's; only passwords differ.
    def rules(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if "password:" not in ln and not ln.startswith("#")]

    assert rules(committed) == rules(permissions.server_config(PASSWORDS))
    for role in permissions.ROLES:
        assert f"password: ${permissions.password_env(role)}" in committed


def test_main_writes_the_k8s_config(capsys):
    assert permissions.main(["--k8s"]) == 0
    assert capsys.readouterr().out == permissions.k8s_config()


# --- against a real server ------------------------------------------------------------


async def test_wrong_password_is_refused(server):
    async def quiet(err: Exception) -> None:
        pass

    nc = Client()
    try:
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nc.connect(
                server.url,
                user="gateway",
                password="nope",
                error_cb=quiet,
                allow_reconnect=False,
                connect_timeout=2,
            )
    finally:
        await nc.close()  # nats-py leaves the refused socket open otherwise


async def test_handler_sets_up_and_does_its_work(connect):
    handler = await connect(permissions.HANDLER)
    gateway = await connect(permissions.GATEWAY)
    await set_up(handler)
    await set_up(handler)  # a second replica starting: updates in place

    ack = await gateway.js.publish(subjects.event(subjects.PAGE_LOAD, "o/t"), b"load")
    assert ack.stream == subjects.EVENTS_STREAM

    sub = await handler.js.pull_subscribe(
        subjects.kind_filter(subjects.PAGE_LOAD),
        durable=subjects.PAGE_LOAD,
        stream=subjects.EVENTS_STREAM,
    )
    try:
        [msg] = await sub.fetch(1, timeout=5)
        assert msg.data == b"load"
        await msg.in_progress()
        await msg.ack_sync()
    finally:
        await sub.unsubscribe()

    # Handlers emit events for each other (ticks, refills, job updates), status and dead letters.
    for kind in (subjects.REAPER_TICK, subjects.POOL_REFILL, subjects.JOB_UPDATE):
        ack = await handler.js.publish(
            subjects.event_for(kind, "x"), b"e", headers={"Nats-Msg-Id": f"id-{kind}"}
        )
        assert ack.stream == subjects.EVENTS_STREAM
    ack = await handler.js.publish(subjects.app_status("o/t"), b"ready")
    assert ack.stream == subjects.STATUS_STREAM
    ack = await handler.js.publish(subjects.dead(subjects.PAGE_LOAD), b"dead")
    assert ack.stream == subjects.DEAD_STREAM

    # KV: compare-and-set writes, reads, listing and watching, on every bucket.
    state = await bus.ensure_state(handler.js, NatsSettings())
    for records in (state.apps, state.deployments, state.jobs, state.revisions):
        kv = records.kv
        rev = await kv.create("o.t", b"1")
        rev = await kv.update("o.t", msgpack.packb({"n": 2}), last=rev)
        assert (await kv.get("o.t")).value == msgpack.packb({"n": 2})
        await wait_for(lambda kv=kv: _lists(kv, ["o.t"]), timeout=5, what="the key listed")
        assert [e.key for e in await Records(kv, Probe).scan()] == ["o.t"]
        await kv.delete("o.t", last=rev)
    assert handler.errors.empty() and gateway.errors.empty()


async def _lists(kv, keys: list[str]) -> bool:
    """Whether listing `kv` gives `keys`. nats-py's `keys()` now and then finds nothing
    right after a write (its watcher's first look may see no pending entry): it raises
    NoKeysError then, which is asked again; a refused listing raises something else."""
    try:
        return await kv.keys() == keys
    except nats.js.errors.NoKeysError:
        return False


async def test_the_handler_runtime_runs_as_handler(server, connect, tmp_path):
    """`spinyard handlers` with every built-in handler, its ticker and job watcher."""
    settings = Settings(data_dir=tmp_path / "data", log_format="console", log_level="warning")
    settings.nats.url = server.url
    settings.nats.user = permissions.HANDLER
    settings.nats.password = SecretStr(PASSWORDS[permissions.HANDLER])
    settings.reaper.interval_s = 0.2
    async with contextlib.AsyncExitStack() as stack:
        backend = await stack.enter_async_context(compose.backend(settings))
        nc = await stack.enter_async_context(compose.nats_client(settings, "handlers"))
        state = await compose.provision(nc.jetstream(), settings, default_registry.select(None))
        await stack.enter_async_context(
            compose.handlers(settings, nc, state, backend=backend, store=None)
        )
        admin = await connect(permissions.ADMIN)

        async def ticks_handled() -> bool:
            info = await admin.js.consumer_info(subjects.EVENTS_STREAM, subjects.REAPER_TICK)
            return info.ack_floor.stream_seq > 0

        await wait_for(ticks_handled, what="a reaper tick published and acked as handler")
    log = (server.store_dir / "nats-server.log").read_text()
    assert "Violation" not in log, log


async def test_handler_cannot_destroy_or_leave_its_subjects(connect):
    handler = await connect(permissions.HANDLER)
    await set_up(handler)
    events = subjects.EVENTS_STREAM
    await assert_denied(
        handler, handler.js.delete_stream(events), f"$JS.API.STREAM.DELETE.{events}"
    )
    await assert_denied(handler, handler.js.purge_stream(events), f"$JS.API.STREAM.PURGE.{events}")
    await assert_denied(
        handler,
        handler.js.delete_consumer(events, subjects.PAGE_LOAD),
        f"$JS.API.CONSUMER.DELETE.{events}.{subjects.PAGE_LOAD}",
    )
    await assert_denied(
        handler,
        handler.js.add_stream(StreamConfig(name="OTHER", subjects=["other"])),
        "$JS.API.STREAM.CREATE.OTHER",
    )
    await assert_denied(handler, handler.nc.publish("other.subject", b"x"), "other.subject")
    await assert_denied(
        handler,
        subscribe_and_flush(handler, f"{subjects.EVENTS}.>"),
        f"{subjects.EVENTS}.>",
        "subscription",
    )


async def test_gateway_publishes_browser_events_and_reads_state(connect):
    admin = await connect(permissions.ADMIN)
    gateway = await connect(permissions.GATEWAY)
    await set_up(admin)
    state = await bus.ensure_state(admin.js, NatsSettings())
    await state.apps.kv.put("o.t", b"spec")
    await state.deployments.kv.put("o.t.shared", b"dep")
    status_subject = subjects.app_status("o/t")
    await admin.js.publish(status_subject, b"ready")

    for kind in permissions.BROWSER_KINDS:
        ack = await gateway.js.publish(
            subjects.event(kind, "o/t"), b"e", headers={"Nats-Msg-Id": f"gw-{kind}"}
        )
        assert ack.stream == subjects.EVENTS_STREAM

    apps = await gateway.js.key_value(subjects.APPS_BUCKET)
    assert (await apps.get("o.t")).value == b"spec"
    assert await apps.keys() == ["o.t"]
    # Publishing over HTTP: the gateway writes app specs and their revisions, nothing else.
    rev = await apps.update("o.t", b"spec2", last=(await apps.get("o.t")).revision)
    assert (await apps.get("o.t")).revision == rev
    revisions = await gateway.js.key_value(subjects.REVISIONS_BUCKET)
    await revisions.create("o.t", b"history")
    await revisions.delete("o.t")
    deployments = await gateway.js.key_value(subjects.DEPLOYMENTS_BUCKET)
    assert (await deployments.get("o.t.shared")).value == b"dep"

    # Status: the last message by direct get, then changes through an ordered consumer.
    last = await gateway.js.get_last_msg(subjects.STATUS_STREAM, status_subject, direct=True)
    assert last.data == b"ready"
    sub = await gateway.js.subscribe(
        status_subject,
        stream=subjects.STATUS_STREAM,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
    )
    live = await gateway.nc.subscribe(f"{subjects.STATUS}.>")
    try:
        assert (await sub.next_msg(timeout=5)).data == b"ready"
        await admin.js.publish(status_subject, b"stopping")
        assert (await sub.next_msg(timeout=5)).data == b"stopping"
        assert (await live.next_msg(timeout=5)).data == b"stopping"
    finally:
        await sub.unsubscribe()
        await live.unsubscribe()
    # As the gateway's SSE streams do when the browser goes.
    assert await gateway.js.delete_consumer(subjects.STATUS_STREAM, sub._consumer)
    assert gateway.errors.empty()


async def test_gateway_cannot_act_as_a_handler(connect):
    admin = await connect(permissions.ADMIN)
    gateway = await connect(permissions.GATEWAY)
    await set_up(admin)

    for kind in set(subjects.KINDS) - set(permissions.BROWSER_KINDS):
        subject = subjects.event_for(kind, "x")
        await assert_denied(gateway, gateway.js.publish(subject, b"e"), subject)
    deployments = await gateway.js.key_value(subjects.DEPLOYMENTS_BUCKET)
    await assert_denied(
        gateway, deployments.put("o.t", b"x"), f"$KV.{subjects.DEPLOYMENTS_BUCKET}.o.t"
    )
    await assert_denied(
        gateway,
        gateway.js.key_value("spinyard_other"),
        "$JS.API.STREAM.INFO.KV_spinyard_other",
    )
    status = subjects.job_status("j-1")
    await assert_denied(gateway, gateway.js.publish(status, b"x"), status)
    await assert_denied(
        gateway,
        subscribe_and_flush(gateway, f"{subjects.EVENTS}.>"),
        f"{subjects.EVENTS}.>",
        "subscription",
    )
    await assert_denied(
        gateway,
        gateway.js.pull_subscribe(
            subjects.kind_filter(subjects.PAGE_LOAD),
            durable=subjects.PAGE_LOAD,
            stream=subjects.EVENTS_STREAM,
        ),
        f"$JS.API.CONSUMER.INFO.{subjects.EVENTS_STREAM}.{subjects.PAGE_LOAD}",
    )
    await assert_denied(
        gateway,
        gateway.js.delete_consumer(subjects.EVENTS_STREAM, subjects.PAGE_LOAD),
        f"$JS.API.CONSUMER.DELETE.{subjects.EVENTS_STREAM}.{subjects.PAGE_LOAD}",
    )
    await assert_denied(
        gateway,
        gateway.js.add_stream(StreamConfig(name="X", subjects=["x"])),
        "$JS.API.STREAM.CREATE.X",
    )
    await assert_denied(
        gateway,
        gateway.js.delete_stream(subjects.STATUS_STREAM),
        f"$JS.API.STREAM.DELETE.{subjects.STATUS_STREAM}",
    )


async def test_admin_may_do_anything(connect):
    admin = await connect(permissions.ADMIN)
    await set_up(admin)
    await admin.js.add_stream(StreamConfig(name="SCRATCH", subjects=["scratch.>"]))
    assert (await admin.js.publish("scratch.x", b"x")).stream == "SCRATCH"
    assert await admin.js.delete_stream("SCRATCH")
    assert await admin.js.delete_consumer(subjects.EVENTS_STREAM, subjects.HEARTBEAT)
    await subscribe_and_flush(admin, ">")
    assert admin.errors.empty()
