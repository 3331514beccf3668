"""Prometheus text exposition, by hand: a few counters and histograms need no dependency.

The gateway and the handler service both render their metrics with these.
"""

import bisect
from collections import Counter

# Seconds: from a warm page load (~ms) to a slow cold start.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def family(name: str, kind: str, help_text: str) -> list[str]:
    """The HELP and TYPE lines of a metric family."""
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def labels(**values: str) -> str:
    """`{k="v",...}` with values escaped; empty when there are none."""
    if not values:
        return ""

    def escape(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in values.items()) + "}"


class Histogram:
    """Cumulative-bucket histogram, optionally split by one tuple of label values."""

    def __init__(self, label_names: tuple[str, ...] = (), buckets: tuple[float, ...] = BUCKETS):
        self.label_names = label_names
        self.buckets = buckets
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sum: Counter[tuple[str, ...]] = Counter()
        self._n: Counter[tuple[str, ...]] = Counter()

    def observe(self, seconds: float, *label_values: str) -> None:
        counts = self._counts.setdefault(label_values, [0] * len(self.buckets))
        i = bisect.bisect_left(self.buckets, seconds)
        if i < len(self.buckets):
            counts[i] += 1
        self._sum[label_values] += seconds
        self._n[label_values] += 1

    def render(self, name: str, help_text: str) -> list[str]:
        out = family(name, "histogram", help_text)
        for key in sorted(self._counts):
            base = dict(zip(self.label_names, key, strict=True))
            cumulative = 0
            for bound, n in zip(self.buckets, self._counts[key], strict=True):
                cumulative += n
                out.append(f"{name}_bucket{labels(**base, le=repr(bound))} {cumulative}")
            out.append(f"{name}_bucket{labels(**base, le='+Inf')} {self._n[key]}")
            out.append(f"{name}_sum{labels(**base)} {self._sum[key]!r}")
            out.append(f"{name}_count{labels(**base)} {self._n[key]}")
        return out


def counter_lines(
    name: str, help_text: str, counts: Counter, label_names: tuple[str, ...]
) -> list[str]:
    """A counter family from a Counter keyed by label-value tuples."""
    out = family(name, "counter", help_text)
    for key, n in sorted(counts.items()):
        out.append(f"{name}{labels(**dict(zip(label_names, key, strict=True)))} {n}")
    return out
