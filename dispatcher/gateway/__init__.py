"""The aiohttp gateway: how browsers reach spinyard (events, status, app proxy, embed.js).

`app.make_app` / `app.start_gateway` build and start it; `events` takes
`POST /v1/events`, `sse` answers status (JSON or Server-Sent Events),
`proxy` relays to app instances, `auth` checks JWTs and `security` applies
them (with origins and frame-ancestors), and `static/` holds the embed
snippet and the demo page. This module holds what
all of them share: the error they answer with, the request keys an auth
hook may read, and the metrics they count.
"""

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel

from dispatcher.metrics import BUCKETS, new_registry
from schemas.errors import ErrorBody

# Set before the auth hook runs: the session in play (the event's, or `?session=`), and on
# `POST /v1/events` the parsed event itself.
SESSION = web.RequestKey("session", str)
EVENT = web.RequestKey("event", BaseModel)


class GatewayError(Exception):
    """An answer with the public error body; an auth hook raises it to reject a request."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str) -> web.Response:
    """`{"error": {"code", "message"}}` with `status`."""
    body = ErrorBody.of(code, message).model_dump(mode="json")
    return web.json_response(body, status=status)


class Metrics:
    """The gateway's Prometheus metrics, on a registry it is given or makes."""

    def __init__(
        self, sse_clients: Callable[[], int], registry: CollectorRegistry | None = None
    ) -> None:
        """
        Args:
            sse_clients: the number of open status streams, read at each scrape.
            registry: where the metrics are registered; a new one if None.
        """
        self.registry = registry if registry is not None else new_registry()
        self.events = Counter(
            "spinyard_gateway_events",  # exposed as spinyard_gateway_events_total
            "Events received, by type and outcome.",
            ["type", "outcome"],
            registry=self.registry,
        )
        self.requests = Counter(
            "spinyard_gateway_requests",  # exposed as spinyard_gateway_requests_total
            "HTTP answers, by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.sse_clients = Gauge(
            "spinyard_gateway_sse_clients", "Open status streams.", registry=self.registry
        )
        self.sse_clients.set_function(sse_clients)
        self.publish = Histogram(
            "spinyard_gateway_publish_seconds",
            "Time to publish an event and get JetStream's ack.",
            buckets=BUCKETS[:12],  # up to 5 s: a publish is not a cold start
            registry=self.registry,
        )

    def count_event(self, kind: str, outcome: str) -> None:
        """One event received; `kind` must come from a fixed set (label cardinality)."""
        self.events.labels(type=kind, outcome=outcome).inc()

    def count_request(self, route: str, status: int) -> None:
        """One answer; `route` is the route's pattern, never the concrete path."""
        self.requests.labels(route=route, status=str(status)).inc()

    def observe_publish(self, seconds: float) -> None:
        self.publish.observe(seconds)
