"""The aiohttp gateway: how browsers reach spinyard (events, status, app proxy, embed.js).

`app.make_app` / `app.start_gateway` build and start it; `sse` answers
status (JSON or Server-Sent Events), `proxy` relays to app instances, and
`static/` holds the embed snippet and the demo page. This module holds what
all of them share: the error they answer with, the request keys an auth
hook may read, and the metrics they count.
"""

import bisect
from collections import Counter

from aiohttp import web
from pydantic import BaseModel

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
    """The gateway's Prometheus metrics, kept by hand: a few counters need no dependency."""

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

    def __init__(self) -> None:
        self.events: Counter[tuple[str, str]] = Counter()
        self.requests: Counter[tuple[str, str]] = Counter()
        self.publish_buckets = [0] * len(self.BUCKETS)
        self.publish_sum = 0.0
        self.publish_count = 0

    def count_event(self, kind: str, outcome: str) -> None:
        """One event received; `kind` must come from a fixed set (label cardinality)."""
        self.events[(kind, outcome)] += 1

    def count_request(self, route: str, status: int) -> None:
        """One answer; `route` is the route's pattern, never the concrete path."""
        self.requests[(route, str(status))] += 1

    def observe_publish(self, seconds: float) -> None:
        self.publish_count += 1
        self.publish_sum += seconds
        i = bisect.bisect_left(self.BUCKETS, seconds)
        if i < len(self.BUCKETS):
            self.publish_buckets[i] += 1

    def render(self, sse_clients: int) -> str:
        """Everything in the Prometheus text format (version 0.0.4)."""
        events, requests = "spinyard_gateway_events_total", "spinyard_gateway_requests_total"
        out = _family(events, "counter", "Events received, by type and outcome.")
        for (kind, outcome), n in sorted(self.events.items()):
            out.append(f"{events}{_labels(type=kind, outcome=outcome)} {n}")
        out += _family(requests, "counter", "HTTP answers, by route and status.")
        for (route, status), n in sorted(self.requests.items()):
            out.append(f"{requests}{_labels(route=route, status=status)} {n}")
        out += _family("spinyard_gateway_sse_clients", "gauge", "Open status streams.")
        out.append(f"spinyard_gateway_sse_clients {sse_clients}")
        name = "spinyard_gateway_publish_seconds"
        out += _family(name, "histogram", "Time to publish an event and get JetStream's ack.")
        cumulative = 0
        for bound, n in zip(self.BUCKETS, self.publish_buckets, strict=True):
            cumulative += n
            out.append(f"{name}_bucket{_labels(le=repr(bound))} {cumulative}")
        out.append(f"{name}_bucket{_labels(le='+Inf')} {self.publish_count}")
        out.append(f"{name}_sum {self.publish_sum!r}")
        out.append(f"{name}_count {self.publish_count}")
        return "\n".join(out) + "\n"


def _family(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _labels(**values: str) -> str:
    def escape(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in values.items()) + "}"
