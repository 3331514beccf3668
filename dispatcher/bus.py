"""NATS connection and JetStream set-up: streams, KV buckets, durable consumers.

`ensure` is idempotent: every process calls it at start, and a changed
setting updates the stream or consumer in place.
"""

import asyncio

import nats
import nats.errors
from nats.aio.client import Client
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

from dispatcher import logs
from dispatcher.settings import HandlerSettings, NatsSettings
from handlers.registry import HandlerSpec
from handlers.state import State
from schemas import subjects

log = logs.get("spinyard.bus")


class NatsUnavailable(ConnectionError):
    """NATS could not be reached (or refused the credentials) within the startup wait."""


async def _log_error(exc: Exception) -> None:
    log.warning("nats_error", error=repr(exc))  # connection trouble; the client retries


async def _log_disconnected() -> None:
    log.warning("nats_disconnected")


async def _log_reconnected() -> None:
    log.info("nats_reconnected")


async def connect(settings: NatsSettings, name: str, *, wait_s: float | None = None) -> Client:
    """Connect to NATS with the configured credentials.

    Once connected, the client reconnects for ever. The first connection is
    tried for `wait_s` seconds (default: `nats.startup_wait_s`), and at least
    `nats.connect_timeout_s`: what short-lived CLI commands get with 0.

    Raises:
        NatsUnavailable: not connected within the wait; the message names the URL.
    """
    wait = settings.startup_wait_s if wait_s is None else wait_s
    options: dict = {
        "servers": [u.strip() for u in settings.url.split(",")],
        "name": name,
        "connect_timeout": settings.connect_timeout_s,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "error_cb": _log_error,
        "disconnected_cb": _log_disconnected,
        "reconnected_cb": _log_reconnected,
    }
    if settings.user:
        options["user"] = settings.user
        options["password"] = settings.password.get_secret_value() if settings.password else None
    if settings.token:
        options["token"] = settings.token.get_secret_value()
    if settings.creds_file:
        options["user_credentials"] = str(settings.creds_file)
    budget = max(wait, settings.connect_timeout_s)
    try:
        # nats-py retries a first connection for ever when reconnects are unlimited.
        return await asyncio.wait_for(nats.connect(**options), budget)
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        why = f"no connection within {budget:g} s" if isinstance(exc, TimeoutError) else repr(exc)
        raise NatsUnavailable(
            f"cannot reach NATS at {settings.url}: {why}. Check SPINYARD_NATS__URL and the "
            "credentials (with `spinyard up`, source the cli.env its banner names)"
        ) from None


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


async def ensure_state(js: JetStreamContext, settings: NatsSettings) -> State:
    """Open (creating if missing) the KV buckets and wrap them."""
    buckets = []
    for name in (
        subjects.APPS_BUCKET,
        subjects.DEPLOYMENTS_BUCKET,
        subjects.SESSIONS_BUCKET,
        subjects.JOBS_BUCKET,
    ):
        try:
            kv = await js.key_value(name)
        except BucketNotFoundError:
            kv = await js.create_key_value(
                KeyValueConfig(
                    bucket=name,
                    history=1,
                    replicas=settings.replicas,
                    storage=StorageType.FILE,
                    direct=True,
                )
            )
            log.info("bucket_created", bucket=name)
        buckets.append(kv)
    return State(*buckets)


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
    """Create or update everything spinyard needs on JetStream; return the KV state."""
    await ensure_streams(js, nats_settings)
    state = await ensure_state(js, nats_settings)
    await ensure_consumers(js, specs, handler_settings)
    return state
