"""Summaries of timing samples: p50/p99, ratios against a baseline, and plain-text tables.

Percentiles interpolate linearly between the closest ranks (numpy's default),
so p99 of 1,000 samples sits between the 990th and 991st smallest. Every
figure is kept in milliseconds in the result dicts the benches return and
`python -m bench --json` writes.
"""

import math
import os
import platform
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path


def percentile(samples: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100) of `samples`, linearly interpolated.

    Raises:
        ValueError: no samples, or `q` outside 0..100.
    """
    if not samples:
        raise ValueError("no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not within 0..100")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ratio(value: float | None, baseline: float | None) -> float | None:
    """`value / baseline`, or None when either is missing or the baseline is 0."""
    if value is None or not baseline:
        return None
    return value / baseline


def latency(name: str, seconds: Sequence[float], **extra) -> dict:
    """A latency row from samples in seconds: n, p50, p99, mean, min and max in ms (None if
    there are no samples)."""
    ms = [s * 1000 for s in seconds]
    if not ms:
        keys = ("p50_ms", "p99_ms", "mean_ms", "min_ms", "max_ms")
        return {"name": name, "n": 0, **dict.fromkeys(keys), **extra}
    return {
        "name": name,
        "n": len(ms),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "mean_ms": sum(ms) / len(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
        **extra,
    }


def rate(name: str, count: int, seconds: float, **extra) -> dict:
    """A throughput row: `count` things in `seconds`."""
    return {"name": name, "n": count, "seconds": seconds, "per_s": count / seconds, **extra}


def add_ratios(rows: list[dict], baseline: dict) -> list[dict]:
    """Give each latency row its p50 and p99 ratio to `baseline`'s."""
    for row in rows:
        row["ratio_p50"] = ratio(row["p50_ms"], baseline["p50_ms"])
        row["ratio_p99"] = ratio(row["p99_ms"], baseline["p99_ms"])
    return rows


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def machine() -> dict:
    """What the figures were measured on."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "nproc": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "loadavg_1m": os.getloadavg()[0],  # other work on the machine skews every figure
    }


def load_line(result: dict) -> str:
    """The closing line every bench prints: the 1-minute load average at its start and end."""
    start, end = result["machine"]["loadavg_1m"], result["loadavg_1m_end"]
    return f"load average (1 min): {start:.2f} at start, {end:.2f} at end"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def table(rows: Iterable[dict], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as an aligned text table; `columns` are (heading, key) pairs."""
    cells = [[heading for heading, _ in columns]]
    cells += [[_cell(row.get(key)) for _, key in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = []
    for i, line in enumerate(cells):
        first = line[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]
        lines.append("  ".join([first, *rest]))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


LATENCY_COLUMNS = (
    ("name", "name"),
    ("n", "n"),
    ("p50 ms", "p50_ms"),
    ("p99 ms", "p99_ms"),
    ("ratio p50", "ratio_p50"),
    ("ratio p99", "ratio_p99"),
)
RATE_COLUMNS = (("name", "name"), ("n", "n"), ("seconds", "seconds"), ("per s", "per_s"))
