"""Where a process's samples went, from a py-spy raw profile: by library and by step.

    py-spy record --pid PID -d 45 -r 200 --format raw -o gateway.raw --nonblocking
    python -m bench.profile gateway.raw
    py-spy record --subprocesses -r 200 -f raw -o prof.txt -- python -m bench handlers
    python -m bench.profile prof.txt PID      # one process of several; its start-up left out

"Self" attributes each sample to the library of its innermost frame (where
the CPU was; socket sends and epoll waits apart: on a busy machine they
include time the process sat preempted in the kernel; on uvloop the loop's
own work is C, so its samples end in `Runner.run`); "in" counts the samples
with a given step's function anywhere on the stack (a step's whole cost, its
callees included). Percentages are of the samples counted. With a PID, only
that process's samples count, and only once its event loop runs (imports
and set-up left out).
"""

import sys
from collections import Counter
from pathlib import Path

# Innermost-frame file paths, by the library they belong to (first match wins).
LIBRARIES = (
    ("waiting in epoll", ("EpollSelector.select",)),
    ("socket sends (the syscall)", ("_SelectorSocketTransport.write ",)),
    ("nats-py", ("nats/",)),
    ("aiohttp", ("aiohttp/", "multidict/", "yarl/")),
    ("token checks", ("jwt/", "cryptography/", "hmac", "gateway/auth.py")),
    ("pydantic", ("pydantic",)),
    ("logging", ("structlog/", "logging/", "dispatcher/logs.py")),
    ("prometheus", ("prometheus_client/",)),
    ("codec (msgpack/json)", ("msgpack/", "json/", "schemas/codec.py")),
    ("event loop (asyncio, uvloop)", ("asyncio/", "uvloop/", "selectors.py", "socket.py")),
    ("spinyard", ("dispatcher/", "handlers/", "schemas/")),
)
# Steps of the event path, by a function on the stack: the gateway's, then the handlers'.
STEPS = (
    ("post_event (whole)", "post_event "),
    ("read_body", "read_body "),
    ("parse_event (decode + validate)", "parse_event "),
    ("auth hook (Guard.hook)", "Guard.hook "),
    ("token verify", "Authenticator.verify "),
    ("app spec lookup", "Records.get "),
    ("spec cache", "SpecCache."),
    ("JetStream publish", "JetStreamContext.publish "),
    ("answer (json_response)", "json_response "),
    ("log lines", "BoundLoggerLazyProxy"),
    ("SSE status streams", "StatusStreams."),
    ("fetch (pull requests)", "JetStreamContext.PullSubscription.fetch"),
    ("pull requests (Puller)", "Puller."),
    ("decode + validate (handlers)", "decode ("),
    ("KV reads", "Records.read ("),
    ("KV writes", "Records.put ("),
    ("status publishes", "Context.publish_status ("),
    ("structlog", "structlog/"),
    ("handler metrics", "HandlerMetrics.observe ("),
    ("ack", "Msg.ack ("),
    ("keep-alive tasks", "Consumer._keep_alive ("),
)


def library(frame: str) -> str:
    for name, marks in LIBRARIES:
        if any(mark in frame for mark in marks):
            return name
    return "other"


def summarize(path: Path, pid: str | None = None) -> tuple[int, Counter, Counter]:
    """Samples counted, and their counts by library (self) and by step (in)."""
    total, by_library, by_step = 0, Counter(), Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        if pid is not None and (
            f"process {pid}:" not in stack or "importlib" in stack or "Runner.run (" not in stack
        ):
            continue  # another process, or start-up (imports, or before the loop runs)
        n = int(count)
        total += n
        frames = stack.split(";")
        by_library[library(frames[-1])] += n
        for name, mark in STEPS:
            if any(mark in frame for frame in frames):
                by_step[name] += n
    return total, by_library, by_step


def main(argv: list[str]) -> None:
    path, pid = Path(argv[0]), (argv[1] if len(argv) > 1 else None)
    total, by_library, by_step = summarize(path, pid)
    print(f"{path}: {total} samples" + (f" of process {pid}" if pid else ""))
    if not total:
        return
    print("  self, by library:")
    for name, n in by_library.most_common():
        print(f"    {name:32} {100 * n / total:5.1f}%")
    print("  in, by step:")
    for name, n in by_step.most_common():
        print(f"    {name:32} {100 * n / total:5.1f}%")


if __name__ == "__main__":
    main(sys.argv[1:])
