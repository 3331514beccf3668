"""spinyard on a three-node JetStream cluster, R3 streams and buckets (tests/bus/conftest.py).

Handler processes started before the cluster has leaders come up; concurrent
page loads make one instance, a repeated idempotency key one run and 200
viewers' heartbeats no retry, as on one server; losing a node mid-stream
loses and doubles nothing and ends no handler; a read that follows a write,
through another node, sees it.
"""

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time

import aiohttp
import nats.errors
import nats.js.errors
from pydantic import BaseModel

from dispatcher import bus, compose
from dispatcher.bus import provision
from dispatcher.bus.connect import transient
from dispatcher.embedded.natscluster import NatsCluster
from dispatcher.runtime import Handlers
from handlers.registry import Registry, handler
from handlers.state import Records
from schemas import subjects
from schemas.codec import encode
from schemas.events import PageLoad
from schemas.spec import AppSpec
from tests.bus.test_consumer import NoBackend
from tests.handlers.test_activity import crowd_heartbeats
from tests.handlers.test_runs import running
from tests.handlers.test_runs import test_repeated_idempotency_key_runs_once as one_run_per_key
from tests.handlers.test_viz_lifecycle import running_stack
from tests.handlers.test_viz_lifecycle import (
    test_twenty_concurrent_page_loads_make_one_instance as one_instance_for_twenty,
)
from tests.helpers import free_port, wait_for

VIZ_HANDLERS = ["page_load", "heartbeat", "reaper_tick", "pool_refill"]  # no store needed


def _running(procs: list[subprocess.Popen]) -> bool:
    ended = [p.args for p in procs if p.poll() is not None]
    assert not ended, f"a handler process ended: {ended}"
    return True


async def _healthy(http: aiohttp.ClientSession, port: int) -> bool:
    try:
        async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
            return r.status == 200
    except aiohttp.ClientError:
        return False  # not serving yet: it provisions first


async def test_handler_processes_started_with_a_fresh_cluster_all_come_up(tmp_path):
    cluster = NatsCluster(tmp_path / "cluster")
    first, *others = cluster.nodes
    procs, ports, logs = [], [free_port(), free_port()], []
    try:
        first.start()  # one of three: no quorum, so JetStream cannot answer yet
        for i, port in enumerate(ports):
            env = os.environ | {
                "SPINYARD_NATS__URL": cluster.url,
                "SPINYARD_NATS__REPLICAS": "3",
                "SPINYARD_DATA_DIR": str(tmp_path / f"data{i}"),
                "SPINYARD_HANDLERS__HEALTH_PORT": str(port),
                "SPINYARD_GATEWAY__PUBLIC_URL": "http://127.0.0.1:9999",
                "SPINYARD_LOG_LEVEL": "warning",
            }
            logs.append(tmp_path / f"handlers{i}.log")
            with open(logs[-1], "wb") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "dispatcher.cli", "handlers", *VIZ_HANDLERS],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        await wait_for(
            lambda: _running(procs) and all("bus_not_ready" in log.read_text() for log in logs),
            timeout=60,
            what="both processes waiting for the cluster",
        )
        for node in others:
            node.start()
        async with aiohttp.ClientSession() as http:
            for port in ports:
                await wait_for(
                    lambda port=port: _running(procs) and _healthy(http, port),
                    timeout=60,
                    what=f"/healthz on {port}",
                )
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(30)
        cluster.stop()
    assert [p.returncode for p in procs] == [0, 0], [log.read_text()[-2000:] for log in logs]


async def test_twenty_concurrent_page_loads_make_one_instance(r3_settings):
    async with running_stack(r3_settings) as stack:
        await one_instance_for_twenty(stack)


async def test_heartbeats_of_200_viewers_on_one_app_dead_letter_nothing(r3_settings):
    async with running_stack(r3_settings, ["page_load", "heartbeat"]) as stack:
        await crowd_heartbeats(stack)


async def test_repeated_idempotency_key_runs_once(r3_settings, s3_server, tmp_path):
    async with running(r3_settings, s3_server) as runs:
        await one_run_per_key(runs, tmp_path)


class Ledger(BaseModel):
    """The events a test handler has taken effect for, in order."""

    ids: list[str] = []


async def _publish_until_stored(js, event: PageLoad) -> None:
    """Publish as a client of the gateway would: again after a failure, with the same id."""
    deadline = time.monotonic() + 60
    while True:
        try:
            await js.publish(
                subjects.event(subjects.PAGE_LOAD, event.app),
                encode(event),
                headers={"Nats-Msg-Id": event.id},
                timeout=2,
            )
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def _poll_health(port: int, seen: list[int], stop: asyncio.Event) -> None:
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                body = await r.json()
                assert body["ok"] is (r.status == 200)
                assert r.status == 200 or not body["nats"] or body["failing"]
                seen.append(r.status)
            await asyncio.sleep(0.05)


async def test_losing_a_node_mid_stream_loses_and_doubles_nothing(r3_settings, nats_cluster):
    registry = Registry()
    calls: list[str] = []

    @handler(subjects.PAGE_LOAD, schema=PageLoad, concurrency=4, registry=registry)
    async def take_effect(ctx, event):
        calls.append(event.id)

        def add(ledger: Ledger) -> Ledger | None:
            return None if event.id in ledger.ids else Ledger(ids=[*ledger.ids, event.id])

        await ledger.change("ledger", add, default=Ledger)

    settings = r3_settings
    settings.handlers.health_port = 0
    nc = await bus.connect(settings.nats, "test-handlers")
    publisher = await bus.connect(settings.nats, "test-publisher")
    js = publisher.jetstream()
    state = await compose.provision(nc.jetstream(), settings, registry.select(None))
    ledger = Records(state.jobs.kv, Ledger)
    service = Handlers(settings, nc=nc, state=state, backend=NoBackend(), registry=registry)
    task = asyncio.create_task(service.run(), name="handlers-under-test")
    await asyncio.wait_for(service.ready.wait(), 10)
    statuses: list[int] = []
    stop_polling = asyncio.Event()
    poller = asyncio.create_task(_poll_health(service.health_port, statuses, stop_polling))
    events = [PageLoad(app="a/b", session=f"s-{i}") for i in range(150)]
    killed = None
    try:
        for i, event in enumerate(events):
            if i == 50:  # the page_load consumer's leader goes away mid-stream
                info = await js.consumer_info(subjects.EVENTS_STREAM, "page_load")
                killed = nats_cluster.nodes[int(info.cluster.leader.removeprefix("n"))]
                killed.proc.kill()
                killed.proc.wait()
            await _publish_until_stored(js, event)
            await asyncio.sleep(0.02)
        done = await wait_for(
            lambda: _alive(task) and _ledger_has(ledger, len(events)),
            timeout=90,
            what="every event's effect",
        )
        await wait_for(lambda: statuses and statuses[-1] == 200, timeout=30, what="healthy again")
        assert _alive(task)
        assert sorted(done.ids) == sorted(e.id for e in events)  # nothing lost, nothing twice
        assert 503 in statuses  # it said so while it could not fetch

        async def dead_letters():  # (the returned node may still be catching up: ask again)
            try:
                return await js.stream_info(subjects.DEAD_STREAM)
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
                return None

        info = await wait_for(dead_letters, timeout=30, what="the dead-letter stream's answer")
        assert info.state.messages == 0
        await wait_for(lambda: _events_empty(js), timeout=30, what="every event acked")
    finally:
        stop_polling.set()
        await poller
        service.stop()
        await task
        await nc.close()
        await publisher.close()
        if killed is not None:
            killed.start()  # the cluster whole again for the tests after this one


def _alive(task: asyncio.Task) -> bool:
    assert not task.done(), "the handler service ended"
    return True


async def _ledger_has(ledger: Records, count: int) -> Ledger | None:
    try:
        got = await ledger.get("ledger")
    except Exception:  # the bus is still settling
        return None
    return got if got is not None and len(got.ids) >= count else None


async def _events_empty(js) -> bool:
    return (await js.stream_info(subjects.EVENTS_STREAM)).state.messages == 0


async def test_reads_that_follow_writes_through_another_node_are_never_stale(
    r3_settings, nats_cluster
):
    # One client per node, as handler replicas spread over the cluster are: each write
    # goes through one node and the read that follows it through another.
    clients = []
    for node in nats_cluster.nodes:
        one = r3_settings.model_copy(deep=True)
        one.nats.url = node.url
        clients.append(await bus.connect(one.nats, f"test-{node.url}"))
    try:
        states = [await bus.ensure_state(c.jetstream(), r3_settings.nats) for c in clients]
        missed, stale = [], []

        async def sequence(i: int) -> None:
            writer, changer, reader = (states[(i + k) % 3] for k in range(3))
            name = f"raw/app-{i}"
            await writer.apps.create(name, AppSpec(name=name, command=["true"]))
            changed = await changer.apps.change(
                name, lambda spec: spec.model_copy(update={"start_timeout_s": 7.0})
            )
            if changed is None:  # the change did not see the record just created
                missed.append(i)
                return
            read = await reader.apps.read(name)
            if read is None or read.revision != changed.revision:
                stale.append(i)

        # Many at once: followers lag most under load (where direct gets were seen stale).
        for start in range(0, 1000, 100):
            await asyncio.gather(*(sequence(i) for i in range(start, start + 100)))
        assert (missed, stale) == ([], [])
    finally:
        for c in clients:
            await c.close()


async def test_replicated_buckets_are_read_from_their_leader_even_if_made_for_direct_gets(
    r3_settings,
):
    nc = await bus.connect(r3_settings.nats, "test")
    try:
        js = nc.jetstream()
        # As an older spinyard left them: direct gets allowed, so any replica may answer.
        await js.delete_key_value(subjects.JOBS_BUCKET)
        old = provision.bucket_config(subjects.JOBS_BUCKET, r3_settings.nats)
        await js.create_key_value(dataclasses.replace(old, direct=True))
        state = await bus.ensure_state(js, r3_settings.nats)
        for records in (state.apps, state.deployments, state.jobs):
            info = await js.stream_info(records.kv._stream)
            assert (info.config.num_replicas, info.config.allow_direct) == (3, False)
            assert records.kv._direct is False  # nats-py asks the leader ($JS.API.STREAM.MSG.GET)
    finally:
        await nc.close()


def test_what_a_cluster_says_while_it_settles_is_retried_and_a_refusal_is_not():
    def api_error(code: int, err_code: int) -> nats.js.errors.APIError:
        return nats.js.errors.ServerError(code=code, err_code=err_code, description="...")

    # a replica's store not made yet (a node still removing a just-deleted stream's):
    assert transient(api_error(500, 10049))
    assert transient(api_error(503, 10008))
    assert transient(nats.js.errors.ServiceUnavailableError(code=503, description="no leader"))
    # a stream of that name with another configuration: no wait makes it go away
    assert not transient(api_error(400, 10058))
