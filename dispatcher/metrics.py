"""What spinyard's metrics share: a registry per service, the histogram buckets, the served text.

The gateway (`dispatcher.gateway.Metrics`) and the handler service
(`dispatcher.bus.consumer.HandlerMetrics`) define their metrics with
`prometheus_client` on a `CollectorRegistry` they are given or make, never
on the library's global default registry: one process may hold a gateway and
a handler service (`spinyard up`), and the tests build many of each, while
the global registry refuses a second metric of the same name. Each `/metrics`
endpoint serves its registry with `exposition`.
"""

import prometheus_client
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

# Counters and histograms would also expose a `<name>_created` sample (their start time) per
# label set: a second series for each one that docs/operations.md does not list and the
# dashboards do not use. Process-wide, so it is done once, when this module is imported.
prometheus_client.disable_created_metrics()

# Seconds: from a warm page load (~ms) to a slow cold start.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def new_registry() -> prometheus_client.CollectorRegistry:
    """A new registry, empty: its owner registers its metrics on it and serves it."""
    return prometheus_client.CollectorRegistry()


def exposition(registry: prometheus_client.CollectorRegistry) -> tuple[bytes, str]:
    """Everything in `registry`, in the Prometheus text format.

    Returns:
        The body and its Content-Type. The type names version 0.0.4 of the text format,
        which every Prometheus scrapes (3.x refuses a bare `text/plain`); metric names
        here are plain ASCII, so the body is the same as in version 1.0.0.
    """
    return prometheus_client.generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4
