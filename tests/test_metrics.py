"""Metrics registries: each service's own, or one shared per process, never the global one."""

import prometheus_client

from dispatcher.bus.consumer import HandlerMetrics
from dispatcher.gateway import Metrics
from dispatcher.metrics import exposition, new_registry
from tests.helpers import parse_metrics


def test_services_with_their_own_registries_do_not_collide():
    # The tests build many gateways and handler services in one process: on the library's
    # global registry the second one would raise "Duplicated timeseries".
    first, second = Metrics(lambda: 0), Metrics(lambda: 0)
    handlers = [HandlerMetrics(), HandlerMetrics()]
    first.count_event("page_load", "accepted")
    handlers[0].observe("page_load", "ok", 0.01)
    counted = {"type": "page_load", "outcome": "accepted"}
    assert first.registry.get_sample_value("spinyard_gateway_events_total", counted) == 1
    assert second.registry.get_sample_value("spinyard_gateway_events_total", counted) is None
    assert (
        handlers[1].registry.get_sample_value(
            "spinyard_handler_duration_seconds_count", {"handler": "page_load"}
        )
        is None
    )
    global_registry = prometheus_client.REGISTRY
    assert global_registry.get_sample_value("spinyard_gateway_events_total", counted) is None


def test_one_registry_shared_by_a_gateway_and_handlers_exposes_both():
    shared = new_registry()
    gateway = Metrics(lambda: 2, shared)
    handlers = HandlerMetrics(shared)
    gateway.count_request("/v1/events", 202)
    handlers.observe("page_load", "ok", 0.003)
    body, content_type = exposition(shared)
    samples = parse_metrics(body.decode())
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert samples[("spinyard_gateway_sse_clients", frozenset())] == 2
    route = frozenset({("route", "/v1/events"), ("status", "202")})
    assert samples[("spinyard_gateway_requests_total", route)] == 1
    page_load = frozenset({("handler", "page_load")})
    assert samples[("spinyard_handler_duration_seconds_count", page_load)] == 1
    assert samples[("spinyard_handler_duration_seconds_bucket", page_load | {("le", "0.005")})] == 1
    assert (
        samples[("spinyard_handler_duration_seconds_bucket", page_load | {("le", "0.0025")})] == 0
    )
    assert not any(name.endswith("_created") for name, _ in samples)
