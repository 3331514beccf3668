"""Status fan-out over real HTTP and a real nats-server: one shared consumer per subject.

What the server says is the evidence: the status stream's consumer count
(one per subject however many clients watch it, none once they all left),
and what each client reads off its socket.
"""

import asyncio
import json
import socket

import msgpack
import nats.errors

from dispatcher.gateway.fanout import QUEUE_SIZE
from dispatcher.gateway.keys import STREAMS
from schemas import subjects
from tests.gateway.test_gateway import SSE, next_event
from tests.helpers import wait_for

VIZ_STATUS = subjects.app_status("demo/viz")
VIZ_URL = "/v1/apps/demo/viz/status"


async def consumers(env) -> list[str]:
    return sorted(c.name for c in await env.js.consumers_info(subjects.STATUS_STREAM))


async def publish(env, subject: str, k: int, **extra) -> int:
    """A status carrying `k`; its stream sequence."""
    ack = await env.js.publish(subject, msgpack.packb({"state": "ready", "k": k, **extra}))
    return ack.seq


async def gateway(env, **settings):
    for name, value in settings.items():
        setattr(env.settings.gateway, name, value)
    return await env.start()


async def test_clients_of_one_subject_share_one_consumer_and_its_last_status(env):
    runner = await gateway(env, sse_linger_s=0.2)
    first_seq = await publish(env, VIZ_STATUS, 1)
    streams = [
        await env.http.get(runner.url + VIZ_URL, headers=SSE).__aenter__() for _ in range(20)
    ]
    try:
        for resp in streams:
            assert resp.status == 200
            event = await next_event(resp)
            assert (event["json"]["k"], int(event["id"])) == (1, first_seq)
        assert len(await consumers(env)) == 1
        assert runner.app[STREAMS].clients == 20
        assert list(runner.app[STREAMS].fanout.topics) == [VIZ_STATUS]

        seq = await publish(env, VIZ_STATUS, 2)
        for resp in streams:
            event = await next_event(resp)
            assert (event["json"]["k"], int(event["id"])) == (2, seq)
        assert len(await consumers(env)) == 1
    finally:
        for resp in streams:
            resp.close()

    async def all_gone():
        return not await consumers(env) and runner.app[STREAMS].clients == 0

    await wait_for(all_gone, what="the shared consumer to be deleted after the last client")
    assert runner.app[STREAMS].fanout.topics == {}


async def test_subjects_get_a_consumer_each_and_keep_their_own_statuses(env):
    runner = await gateway(env, sse_linger_s=0.2)
    job_ids = ["j-0123456789abcdef0001", "j-0123456789abcdef0002"]
    for i, job_id in enumerate(job_ids):
        await publish(env, subjects.job_status(job_id), i, job_id=job_id)
    streams = {
        job_id: await env.http.get(
            f"{runner.url}/v1/jobs/{job_id}/status", headers=SSE
        ).__aenter__()
        for job_id in job_ids
    }
    try:
        for job_id, resp in streams.items():
            assert (await next_event(resp))["json"]["job_id"] == job_id
        assert len(await consumers(env)) == 2
    finally:
        for resp in streams.values():
            resp.close()
    await wait_for(lambda: _no_consumer(env), what="both consumers to be deleted")


async def _no_consumer(env) -> bool:
    return not await consumers(env)


async def test_a_client_back_within_the_linger_finds_the_same_consumer(env):
    runner = await gateway(env, sse_linger_s=30.0)
    await publish(env, VIZ_STATUS, 1)
    async with env.http.get(runner.url + VIZ_URL, headers=SSE) as resp:
        await next_event(resp)
        before = await consumers(env)
    await wait_for(lambda: runner.app[STREAMS].clients == 0, what="the client to leave")
    async with env.http.get(runner.url + VIZ_URL, headers=SSE) as resp:
        assert (await next_event(resp))["json"]["k"] == 1  # from memory, at once
        assert await consumers(env) == before and len(before) == 1
    await runner.cleanup()  # gateway cleanup deletes lingering consumers too
    env.runners.remove(runner)
    assert await consumers(env) == []


class PublishingAround:
    """The gateway's JetStream context, publishing a status just before each subscription is
    made and another just after: a change racing the first client's snapshot."""

    def __init__(self, js, subject: str) -> None:
        self.js, self.subject, self.seqs = js, subject, []

    def __getattr__(self, name):
        return getattr(self.js, name)

    async def subscribe(self, *args, **kwargs):
        self.seqs.append(await publish(self, self.subject, len(self.seqs) + 1))
        sub = await self.js.subscribe(*args, **kwargs)
        self.seqs.append(await publish(self, self.subject, len(self.seqs) + 1))
        return sub


async def test_statuses_published_while_the_first_client_subscribes_all_arrive_in_order(env):
    runner = await gateway(env, sse_linger_s=0)
    fanout = runner.app[STREAMS].fanout
    around = fanout.js = PublishingAround(env.js, VIZ_STATUS)
    await publish(env, VIZ_STATUS, 0)
    async with env.http.get(runner.url + VIZ_URL, headers=SSE) as resp:
        seen = [await next_event(resp)]
        while seen[-1]["json"]["k"] != 2:
            seen.append(await next_event(resp))
    # The status published before the consumer existed (k=1) was its snapshot, unless the
    # one published after (k=2) had already replaced it in the stream (which keeps one
    # message per subject): either way nothing older (k=0), nothing missed, nothing repeated.
    assert [e["json"]["k"] for e in seen] in ([1, 2], [2])
    assert [int(e["id"]) for e in seen] == around.seqs[-len(seen) :]


async def test_a_burst_during_opens_never_goes_backwards_and_ends_on_the_last(env):
    runner = await gateway(env, sse_linger_s=0)
    last = 60

    async def burst():
        for k in range(1, last + 1):
            await publish(env, VIZ_STATUS, k)
            await asyncio.sleep(0)

    async def watch() -> list[int]:
        async with env.http.get(runner.url + VIZ_URL, headers=SSE) as resp:
            ids, ks = [], []
            while not ks or ks[-1] != last:
                event = await next_event(resp)
                ids.append(int(event["id"]))
                ks.append(event["json"]["k"])
            assert ids == sorted(set(ids))  # strictly increasing stream sequences
            return ks

    await publish(env, VIZ_STATUS, 0)
    publisher = asyncio.create_task(burst())
    watched = await asyncio.gather(*(watch() for _ in range(8)))
    await publisher
    for ks in watched:
        assert ks == sorted(set(ks)) and ks[-1] == last


async def test_a_redelivering_consumer_does_not_repeat_or_rewind(env):
    runner = await gateway(env, sse_linger_s=0)
    await publish(env, VIZ_STATUS, 1)
    async with env.http.get(runner.url + VIZ_URL, headers=SSE) as resp:
        assert (await next_event(resp))["json"]["k"] == 1
        topic = runner.app[STREAMS].fanout.topics[VIZ_STATUS]
        sub = topic.ready.result()._sub  # the core subscription under nats-py's push one
        # What nats-py does after missed heartbeats: a new consumer from a given sequence;
        # from 1, the server sends the subject's current status again.
        delivered = sub.delivered
        await sub._jsi.reset_ordered_consumer(1)
        await wait_for(lambda: sub.delivered > delivered, what="the status to be re-delivered")
        seq = await publish(env, VIZ_STATUS, 2)
        event = await next_event(resp)
        assert (event["json"]["k"], int(event["id"])) == (2, seq)


async def test_a_slow_client_misses_only_stale_statuses_and_holds_no_one_up(env):
    runner = await gateway(env, sse_linger_s=0)
    await publish(env, VIZ_STATUS, 0)
    host, port = runner.url.removeprefix("http://").split(":")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.connect((host, int(port)))
    slow.sendall(f"GET {VIZ_URL} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
    try:
        await wait_for(lambda: runner.app[STREAMS].clients == 1, what="the slow client")
        async with env.http.get(runner.url + VIZ_URL, headers=SSE) as fast:
            assert (await next_event(fast))["json"]["k"] == 0
            padding = "x" * 64_000  # the slow client's socket fills after some of these
            last = 4 * QUEUE_SIZE
            for k in range(1, last + 1):
                await publish(env, VIZ_STATUS, k, padding=padding)
                assert (await next_event(fast))["json"]["k"] == k
            topic = runner.app[STREAMS].fanout.topics[VIZ_STATUS]
            backlog = max(len(c.pending or ()) for c in topic.clients)
            assert 0 < backlog <= QUEUE_SIZE  # the slow one's, bounded
        # Reading now, the slow client gets statuses in order, ending on the last one, and
        # not every one of them: the oldest were dropped while it was not reading.
        ks = await asyncio.to_thread(read_ks, slow, last)
        assert ks == sorted(set(ks)) and ks[-1] == last and len(ks) < last + 1  # 0 to last
    finally:
        slow.close()


def read_ks(sock: socket.socket, last: int) -> list[int]:
    """The `k` of each status read off a raw SSE socket, until `last`."""
    sock.settimeout(10)
    buffer, ks = b"", []
    while not ks or ks[-1] != last:
        data = sock.recv(65536)
        assert data, "the stream ended"
        buffer += data
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    ks.append(json.loads(line[6:])["k"])
    return ks


async def test_streams_carry_on_after_nats_restarts(env, nats_server):
    runner = await gateway(env, sse_linger_s=0, sse_heartbeat_s=0.2)
    await publish(env, VIZ_STATUS, 1)
    async with (
        env.http.get(runner.url + VIZ_URL, headers=SSE) as a,
        env.http.get(runner.url + VIZ_URL, headers=SSE) as b,
    ):
        assert [(await next_event(r))["json"]["k"] for r in (a, b)] == [1, 1]
        nats_server.stop()
        nats_server.start()

        async def published() -> bool:
            try:
                await publish(env, VIZ_STATUS, 2)
            except (nats.errors.Error, OSError):  # reconnecting
                return False
            return True

        await wait_for(published, timeout=20, interval=0.1, what="a publish after the restart")
        for resp in (a, b):
            assert (await next_event(resp, timeout=20))["json"]["k"] == 2
        assert len(await consumers(env)) == 1
    async with env.http.get(runner.url + VIZ_URL, headers=SSE) as c:
        assert (await next_event(c))["json"]["k"] == 2


async def test_a_failed_subscription_is_503_and_the_next_client_tries_again(env):
    runner = await gateway(env, sse_linger_s=0)
    await publish(env, VIZ_STATUS, 1)
    fanout = runner.app[STREAMS].fanout
    real = fanout.js
    fanout.js = env.nc.jetstream(timeout=0.5, domain="nowhere")  # no JetStream answers there
    async with env.http.get(runner.url + VIZ_URL, headers=SSE) as resp:
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "unavailable"
    assert fanout.topics == {} and runner.app[STREAMS].clients == 0
    fanout.js = real
    async with env.http.get(runner.url + VIZ_URL, headers=SSE) as resp:
        assert (await next_event(resp))["json"]["k"] == 1
