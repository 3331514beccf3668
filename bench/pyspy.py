"""Where one process's CPU went, from a `py-spy record --subprocesses -f raw` file.

    py-spy record --subprocesses -r 200 -f raw -o prof.txt -- python -m bench handlers
    python -m bench.pyspy prof.txt PID

Samples of process PID (its start-up left out: imports, and anything before
the event loop runs) are summed by the library of their innermost frame and
by step (samples with that step's frame anywhere on the stack), in % of its
busy samples. docs/benchmarks.md ("handlers") shows what it printed.
"""

import sys
from pathlib import Path

LIBRARIES = (  # a sample's library: its innermost frame's file, first match
    ("nats-py", ("nats/",)),
    ("pydantic", ("pydantic/", "pydantic_core/")),
    ("logging (structlog, json)", ("structlog/", "json/", "logging/")),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("msgpack", ("msgpack/",)),
    # (on uvloop the loop's own work is C: samples end in `Runner.run`)
    ("event loop (asyncio, uvloop)", ("asyncio/", "uvloop/", "selectors.py", "socket.py")),
    ("spinyard", ("handlers/", "dispatcher/", "schemas/")),
)
STEPS = (  # samples under these frames, inclusive
    ("fetch (pull requests)", "JetStreamContext.PullSubscription.fetch"),
    ("decode + validate", "decode ("),
    ("KV reads", "Records.read ("),
    ("KV writes", "Records.put ("),
    ("status publishes", "Context.publish_status ("),
    ("log lines", "structlog/"),
    ("metrics", "HandlerMetrics.observe ("),
    ("ack", "Msg.ack ("),
    ("keep-alive tasks", "Consumer._keep_alive ("),
)


def summarize(path: Path, pid: str) -> str:
    """Where one process's busy samples of a `py-spy record -f raw` file went, in %."""
    libs: dict[str, int] = {}
    steps: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if f"process {pid}:" not in stack or "importlib" in stack or "Runner.run (" not in stack:
            continue  # another process, or start-up (imports, or before the loop runs)
        frames, n = stack.split(";"), int(count)
        total += n
        leaf = frames[-1]
        lib = next((name for name, keys in LIBRARIES if any(k in leaf for k in keys)), "other")
        libs[lib] = libs.get(lib, 0) + n
        for name, key in STEPS:
            if key in stack:
                steps[name] = steps.get(name, 0) + n

    def shares(counts: dict[str, int]) -> list[str]:
        ordered = sorted(counts.items(), key=lambda item: -item[1])
        return [f"  {name}: {100 * n / total:.1f}%" for name, n in ordered]

    return "\n".join(
        [
            f"{total} busy samples of process {pid}",
            "by library (innermost frame):",
            *shares(libs),
            "by step (inclusive):",
            *shares(steps),
        ]
    )


if __name__ == "__main__":
    print(summarize(Path(sys.argv[1]), sys.argv[2]))
