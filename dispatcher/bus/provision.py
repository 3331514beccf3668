"""JetStream provisioning: the streams, KV buckets and durable consumers spinyard uses.

`ensure` is idempotent: every process calls it at start, and a changed
setting updates the stream, bucket or consumer in place. On a cluster it
waits (up to `nats.startup_wait_s`) through what a cluster answers while it
elects leaders or misses a node: timeouts, 503s, "no suitable peers".

KV buckets with more than one replica are read from their stream's leader
(no direct gets): a direct get may be answered by a follower that has not
applied the last write yet, and a compare-and-set decided on such a read
breaks the promises `handlers.state` exists for. One replica keeps direct
gets, the faster read there.
"""

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BucketNotFoundError, NotFoundError

from dispatcher import logs, waits
from dispatcher.bus.connect import NatsUnavailable, transient
from dispatcher.settings import HandlerSettings, NatsSettings
from handlers.registry import HandlerSpec
from handlers.state import State
from schemas import subjects

log = logs.get("spinyard.bus")


class NotProvisioned(NatsUnavailable):
    """The streams or buckets spinyard needs are not there (the handlers make them)."""


def stream_configs(settings: NatsSettings) -> list[StreamConfig]:
    """The three streams spinyard uses."""
    return [
        StreamConfig(
            name=subjects.EVENTS_STREAM,
            description="spinyard events, one durable consumer per handler kind",
            subjects=[f"{subjects.EVENTS}.>"],
            retention=RetentionPolicy.WORK_QUEUE,
            max_age=settings.events_max_age_s,
            duplicate_window=settings.dedup_window_s,
            storage=StorageType.FILE,
            num_replicas=settings.replicas,
        ),
        StreamConfig(
            name=subjects.STATUS_STREAM,
            description="spinyard status: the last message per app, session and job",
            subjects=[f"{subjects.STATUS}.>"],
            retention=RetentionPolicy.LIMITS,
            max_msgs_per_subject=1,
            max_age=settings.status_max_age_s,
            discard=DiscardPolicy.OLD,
            allow_direct=True,
            storage=StorageType.FILE,
            num_replicas=settings.replicas,
        ),
        StreamConfig(
            name=subjects.DEAD_STREAM,
            description="spinyard dead letters: events that used up their tries, with the reason",
            subjects=[f"{subjects.DEAD}.>"],
            retention=RetentionPolicy.LIMITS,
            max_age=settings.dead_max_age_s,
            storage=StorageType.FILE,
            num_replicas=settings.replicas,
        ),
    ]


def consumer_config(spec: HandlerSpec, settings: HandlerSettings) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=spec.id,
        description=f"spinyard handler {spec.id}",
        filter_subject=spec.filter_subject,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_deliver=spec.max_deliver,
        max_ack_pending=settings.max_ack_pending,
    )


async def ensure_streams(js: JetStreamContext, settings: NatsSettings) -> None:
    for config in stream_configs(settings):
        try:
            await js.stream_info(config.name)
        except NotFoundError:
            await js.add_stream(config)
            log.info("stream_created", stream=config.name)
        else:
            await js.update_stream(config)


def bucket_config(name: str, settings: NatsSettings) -> KeyValueConfig:
    return KeyValueConfig(
        bucket=name,
        history=1,
        replicas=settings.replicas,
        storage=StorageType.FILE,
        direct=settings.replicas == 1,  # replicated: read from the leader (module docstring)
    )


async def ensure_state(js: JetStreamContext, settings: NatsSettings) -> State:
    """Open (creating if missing, updating if its replicas changed) every KV bucket; wrap them."""
    buckets = {}
    for name in subjects.BUCKETS:
        wanted = bucket_config(name, settings)
        try:
            kv = await js.key_value(name)
        except BucketNotFoundError:
            buckets[name] = await js.create_key_value(wanted)
            log.info("bucket_created", bucket=name)
            continue
        config = (await js.stream_info(kv._stream)).config
        if config.num_replicas != wanted.replicas or bool(config.allow_direct) != wanted.direct:
            await js.update_stream(
                config.evolve(num_replicas=wanted.replicas, allow_direct=wanted.direct)
            )
            log.info("bucket_updated", bucket=name, replicas=wanted.replicas)
            kv = await js.key_value(name)  # reads the stream's config again: direct or not
        buckets[name] = kv
    return State.of(buckets)


async def open_state(js: JetStreamContext, wait_s: float = 0.0) -> State:
    """The gateway's KV state: its buckets opened, nothing created (its role may not).

    The handlers create the buckets; a gateway started first waits for them.

    Args:
        js: JetStream, as the gateway.
        wait_s: how long to wait for the buckets to appear, in seconds.

    Raises:
        NotProvisioned: a bucket still did not exist after `wait_s`.
    """

    async def opened() -> State | None:
        try:
            return State.of({b: await js.key_value(b) for b in subjects.GATEWAY_BUCKETS})
        except BucketNotFoundError:
            return None
        except Exception as exc:
            if not transient(exc):
                raise
            log.warning("bus_not_ready", step="open buckets", error=repr(exc))
            return None

    try:
        return await waits.until(opened, wait_s, interval_s=0.25, what="spinyard's KV buckets")
    except TimeoutError:
        raise NotProvisioned(
            f"spinyard's KV buckets do not exist after {wait_s:g} s: start `spinyard handlers` "
            "(it creates them) against the same NATS"
        ) from None


async def ensure_consumers(
    js: JetStreamContext, specs: list[HandlerSpec], settings: HandlerSettings
) -> None:
    for spec in specs:
        await js.add_consumer(subjects.EVENTS_STREAM, consumer_config(spec, settings))


async def ensure(
    js: JetStreamContext,
    nats_settings: NatsSettings,
    specs: list[HandlerSpec],
    handler_settings: HandlerSettings,
) -> State:
    """Create or update everything spinyard needs on JetStream; return the KV state.

    While the bus answers with transient errors (`connect.transient`: a cluster
    electing leaders, a node away), it tries again, for `nats.startup_wait_s`.

    Raises:
        NotProvisioned: JetStream still did not answer after the wait; the
            message has the last error.
    """
    last: list[BaseException] = []

    async def provisioned() -> State | None:
        try:
            await ensure_streams(js, nats_settings)
            state = await ensure_state(js, nats_settings)
            await ensure_consumers(js, specs, handler_settings)
        except Exception as exc:
            if not transient(exc):
                raise
            last[:] = [exc]
            log.warning("bus_not_ready", step="provision", error=repr(exc))
            return None
        return state

    wait_s = nats_settings.startup_wait_s
    try:
        return await waits.until(provisioned, wait_s, interval_s=0.25, what="JetStream")
    except TimeoutError:
        raise NotProvisioned(
            f"JetStream did not answer within {wait_s:g} s (last: {last[0]!r}): with "
            f"replicas={nats_settings.replicas}, more than half of that many NATS servers must "
            "be up and routed to each other"
        ) from None
