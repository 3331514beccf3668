"""The raw NATS baselines' other end, run in its own process like spinyard's handlers.

`python -m bench.nats_peer NATS_URL` answers core request/reply on
`RR_SUBJECT` with the request's bytes, and pulls `JS_STREAM` through the
durable `JS_DURABLE` (fetch up to 16, 1 s long-poll: spinyard's consumer
loop did so until issue 8, and back to back it is the fastest way), publishing
each message's bytes to `JS_REPLY` with an acked JetStream publish, then
acking it. The bench creates the streams and the
consumer (`setup`) before it starts this process; SIGTERM stops it.
"""

import asyncio
import contextlib
import signal
import sys

import nats
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

RR_SUBJECT = "bench.rr"
JS_STREAM = "BENCH_RT"
JS_SUBJECT = "bench.rt.in"
JS_REPLY_STREAM = "BENCH_RT_REPLY"
JS_REPLY = "bench.rt.out"
JS_DURABLE = "bench-rt"


async def setup(js: JetStreamContext) -> None:
    """Create the JetStream floor's streams and consumer, shaped like spinyard's."""
    await js.add_stream(
        StreamConfig(
            name=JS_STREAM,
            subjects=[JS_SUBJECT],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            duplicate_window=120.0,
        )
    )
    await js.add_stream(
        StreamConfig(
            name=JS_REPLY_STREAM,
            subjects=[JS_REPLY],
            max_msgs_per_subject=1,
            storage=StorageType.FILE,
        )
    )
    await js.add_consumer(
        JS_STREAM,
        ConsumerConfig(
            durable_name=JS_DURABLE,
            filter_subject=JS_SUBJECT,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_ack_pending=1000,
        ),
    )


async def pull_loop(
    js: JetStreamContext, stream: str, durable: str, handle, stopping: asyncio.Event
) -> None:
    """Pull `durable` as plain nats-py code would (fetch up to 16, 1 s long-poll), `await
    handle(msg)` then ack each message, until `stopping` is set."""
    pull = await js.pull_subscribe_bind(durable=durable, stream=stream)
    try:
        while not stopping.is_set():
            try:
                msgs = await pull.fetch(16, timeout=1.0)
            except TimeoutError:
                continue
            for msg in msgs:
                await handle(msg)
                await msg.ack()
    finally:
        with contextlib.suppress(Exception):
            await pull.unsubscribe()  # before drain, or drain waits on the pull


async def serve(url: str) -> None:
    nc = await nats.connect(url, name="bench-peer")
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    async def respond(msg) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(RR_SUBJECT, cb=respond)
    js = nc.jetstream()

    async def forward(msg) -> None:
        await js.publish(JS_REPLY, msg.data)

    try:
        await pull_loop(js, JS_STREAM, JS_DURABLE, forward, stopping)
    finally:
        await nc.drain()


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
