"""Connecting to NATS: credentials from settings, a bounded first attempt, endless reconnects;
and which errors mean "the bus is away for now" (`transient`)."""

import asyncio

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client

from dispatcher import logs
from dispatcher.settings import NatsSettings

log = logs.get("spinyard.bus")


class NatsUnavailable(ConnectionError):
    """NATS could not be reached (or refused the credentials) within the startup wait."""


# JetStream API error codes that a cluster gives while it elects leaders or misses a node.
CLUSTER_NOT_READY = {
    10005,  # no suitable peers for placement (peers not known yet, or offline)
    10008,  # JetStream system temporarily unavailable
    10009,  # JetStream cluster can not handle request (no leader)
    10023,  # insufficient resources (too few nodes up for the replicas)
    10049,  # error creating store for stream (a node still removing a deleted one's store)
}


def transient(exc: BaseException) -> bool:
    """Whether `exc` is the bus being away for now: retry it, do not give up.

    Timeouts, no responders, 503s and the cluster's "not ready" API errors come
    and go with leader elections, reconnects and a lost node.
    """
    if isinstance(
        exc,
        TimeoutError  # nats-py's TimeoutError is one too
        | nats.errors.NoRespondersError
        | nats.errors.ConnectionReconnectingError
        | nats.errors.StaleConnectionError
        | nats.js.errors.ServiceUnavailableError,
    ):
        return True
    return isinstance(exc, nats.js.errors.APIError) and exc.err_code in CLUSTER_NOT_READY


async def _log_error(exc: Exception) -> None:
    log.warning("nats_error", error=repr(exc))  # connection trouble; the client retries


def _disconnect_logger(nc: Client):
    """nats-py calls its disconnected callback on a deliberate close too; log only losses."""

    async def disconnected() -> None:
        if not nc.is_closed:
            log.warning("nats_disconnected")

    return disconnected


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
        nc = Client()
        await asyncio.wait_for(
            nc.connect(**options, disconnected_cb=_disconnect_logger(nc)), budget
        )
        return nc
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        why = f"no connection within {budget:g} s" if isinstance(exc, TimeoutError) else repr(exc)
        raise NatsUnavailable(
            f"cannot reach NATS at {settings.url}: {why}. Check SPINYARD_NATS__URL and the "
            "credentials (with `spinyard up`, source the cli.env its banner names)"
        ) from None
