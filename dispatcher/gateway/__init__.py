"""The aiohttp gateway: how browsers reach spinyard (events, status, app proxy, embed.js).

`app.make_app` / `app.start_gateway` build and start it; `sse` answers
status (JSON or Server-Sent Events), `proxy` relays to app instances, and
`static/` holds the embed snippet and the demo page. This module holds what
all of them share: the error they answer with, the request keys an auth
hook may read, and the metrics they count.
"""

from collections import Counter

from aiohttp import web
from pydantic import BaseModel

from dispatcher.metrics import BUCKETS, Histogram, counter_lines, family
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
    """The gateway's Prometheus metrics."""

    def __init__(self) -> None:
        self.events: Counter[tuple[str, str]] = Counter()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.publish = Histogram(buckets=BUCKETS[:12])

    def count_event(self, kind: str, outcome: str) -> None:
        """One event received; `kind` must come from a fixed set (label cardinality)."""
        self.events[(kind, outcome)] += 1

    def count_request(self, route: str, status: int) -> None:
        """One answer; `route` is the route's pattern, never the concrete path."""
        self.requests[(route, str(status))] += 1

    def observe_publish(self, seconds: float) -> None:
        self.publish.observe(seconds)

    def render(self, sse_clients: int) -> str:
        """Everything in the Prometheus text format (version 0.0.4)."""
        out = counter_lines(
            "spinyard_gateway_events_total",
            "Events received, by type and outcome.",
            self.events,
            ("type", "outcome"),
        )
        out += counter_lines(
            "spinyard_gateway_requests_total",
            "HTTP answers, by route and status.",
            self.requests,
            ("route", "status"),
        )
        out += family("spinyard_gateway_sse_clients", "gauge", "Open status streams.")
        out.append(f"spinyard_gateway_sse_clients {sse_clients}")
        out += self.publish.render(
            "spinyard_gateway_publish_seconds", "Time to publish an event and get JetStream's ack."
        )
        return "\n".join(out) + "\n"
