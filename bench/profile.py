"""Summarize a py-spy raw profile: where a process's samples went, by library and by step.

    py-spy record --pid PID -d 45 -r 200 --format raw -o gateway.raw --nonblocking
    python -m bench.profile gateway.raw

"Self" attributes each sample to the library of its innermost frame (where
the CPU was; socket sends and epoll waits apart: on a busy machine they
include time the process sat preempted in the kernel); "in" counts the
samples with a given function anywhere on the stack (a step's whole cost,
its callees included). Percentages are of the samples py-spy kept.
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
    ("asyncio", ("asyncio/", "selectors.py", "socket.py", "uvloop")),
    ("spinyard", ("dispatcher/", "handlers/", "schemas/")),
)
# Steps of the event path, by a function on the stack.
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
)


def library(frame: str) -> str:
    for name, marks in LIBRARIES:
        if any(mark in frame for mark in marks):
            return name
    return "other"


def summarize(path: Path) -> tuple[int, Counter, Counter]:
    total, by_library, by_step = 0, Counter(), Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        by_library[library(frames[-1])] += n
        for name, mark in STEPS:
            if any(mark in frame for frame in frames):
                by_step[name] += n
    return total, by_library, by_step


def main(argv: list[str]) -> None:
    for arg in argv:
        total, by_library, by_step = summarize(Path(arg))
        print(f"{arg}: {total} samples")
        print("  self, by library:")
        for name, n in by_library.most_common():
            print(f"    {name:32} {100 * n / total:5.1f}%")
        print("  in, by step:")
        for name, _ in STEPS:
            print(f"    {name:32} {100 * by_step[name] / total:5.1f}%")


if __name__ == "__main__":
    main(sys.argv[1:])
