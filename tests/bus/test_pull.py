"""Pull requests whose messages are handed over as they arrive (`dispatcher.bus.pull`)."""

import asyncio

import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from dispatcher import bus
from dispatcher.bus.pull import Puller

STREAM, DURABLE = "pulltest", "worker"


@pytest.fixture
async def js(settings):
    nc = await bus.connect(settings.nats, "test-pull")
    js = nc.jetstream()
    await js.add_stream(name=STREAM, subjects=[f"{STREAM}.>"])
    await js.add_consumer(
        STREAM, ConsumerConfig(durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT)
    )
    yield js
    await nc.close()


async def test_a_batch_pulls_messages_are_handed_over_before_the_batch_fills(js):
    """Issue 8: nats-py's fetch held a message of a batch pull until the batch filled or
    the pull expired. A pull of 16 on an empty stream hands over each message at once."""
    got = []
    arrived = asyncio.Event()

    def deliver(msg):
        got.append(msg.data)
        arrived.set()

    puller = Puller(js, STREAM, DURABLE, deliver)
    await puller.start()
    try:
        pull = asyncio.create_task(puller.pull(16, 30.0))
        await asyncio.sleep(0.1)  # the request is waiting on the server
        await js.publish(f"{STREAM}.a", b"one")
        await asyncio.wait_for(arrived.wait(), 10)
        assert got == [b"one"] and not pull.done()  # handed over; the pull still waits
        for i in range(15):
            await js.publish(f"{STREAM}.a", b"more %d" % i)
        assert await asyncio.wait_for(pull, 10) == 16  # the batch filled: it ends
        assert puller.num_pending == 0
    finally:
        await puller.stop()


async def test_a_pull_ends_with_what_it_got_when_it_expires_and_says_what_waits(js):
    got = []
    puller = Puller(js, STREAM, DURABLE, lambda msg: got.append(msg))
    await puller.start()
    try:
        for i in range(5):
            await js.publish(f"{STREAM}.a", b"%d" % i)
        assert await puller.pull(2, 1.0) == 2 and puller.num_pending == 3
        assert await puller.pull(16, 0.2) == 3 and puller.num_pending == 0  # expired
        assert await puller.pull(1, 0.2) == 0  # nothing: the server ends it (408)
        for msg in got:
            await msg.ack_sync()
        assert [m.data for m in got] == [b"0", b"1", b"2", b"3", b"4"]
        info = await js.consumer_info(STREAM, DURABLE)
        assert info.num_pending == 0 and info.num_ack_pending == 0
    finally:
        await puller.stop()
