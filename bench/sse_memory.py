"""What an open SSE stream costs the gateway in memory, and whose objects it is (issue 9).

    python -m bench.sse_memory 2000            # RSS growth per stream
    python -m bench.sse_memory 2000 --trace    # and tracemalloc's top files, per stream

The gateway runs in this process (`start_gateway`, auth on, as `spinyard
gateway` runs it; on asyncio's loop, or uvloop with `--uvloop`), so that
tracemalloc sees its allocations; the streams are opened by `bench.sse_peer
clients` processes, as in `python -m bench fanout`, on one shared app's
status. One stream is opened and closed first (the subscription, the
keep-alive timer and aiohttp's caches are made then, not counted), and a
status change is checked to reach every stream at the end. `--trace` makes
RSS meaningless (tracemalloc's own bookkeeping grows with every allocation):
its RSS line is printed for completeness only. `python -m bench fanout`
gives the RSS figure that counts, against a raw aiohttp server in the same run.
"""

import argparse
import asyncio
import gc
import os
import tempfile
import tracemalloc
from contextlib import AsyncExitStack
from pathlib import Path

from bench.fanout import (
    HALL,
    SECRET,
    go,
    hall,
    payload,
    raise_fd_limit,
    start_workers,
    vmrss_kb,
)
from dispatcher.gateway.app import start_gateway
from dispatcher.gateway.auth import mint
from dispatcher.gateway.security import Guard
from dispatcher.settings import AuthSettings, GatewaySettings
from schemas import subjects


async def measure(streams: int, trace: bool = False, top: int = 12) -> dict:
    """Open `streams` streams on an in-process gateway; what they cost it.

    Returns:
        `rss_per_stream_kb`, `streams` and `closed` (streams the clients saw closed at the
        end), and with `trace`: `traced_bytes_per_stream` and `top`, the `top` files that
        allocated most, each `{"file", "bytes_per_stream", "objects_per_stream"}`.
    """
    raise_fd_limit(streams)
    path = f"/v1/apps/{HALL}/status"
    result: dict = {"streams": streams}
    with tempfile.TemporaryDirectory(prefix="spinyard-bench-sse-memory-") as tmp:
        async with AsyncExitStack() as stack:
            _, nc, state = await hall(Path(tmp), stack, "bench-sse-memory")
            js = nc.jetstream()
            await js.publish(subjects.app_status(HALL), payload(0))
            guard = Guard(AuthSettings(hs256_secret=SECRET), state, "http://127.0.0.1")
            settings = GatewaySettings(port=0, sse_linger_s=60.0)
            runner = await start_gateway(settings, js=js, state=state, backend=None, guard=guard)
            stack.push_async_callback(runner.cleanup)
            token = mint(SECRET, [HALL], ttl_s=3600)
            shares = [streams // 2, streams - streams // 2]
            workers = await start_workers(runner.url, path, shares, token, stack)
            warm = (await start_workers(runner.url, path, [1], token, stack))[0]
            await go([warm])
            await warm.close()
            gc.collect()
            if trace:
                tracemalloc.start()
            before_snapshot = tracemalloc.take_snapshot() if trace else None
            before = vmrss_kb(os.getpid())
            await go(workers)
            await asyncio.sleep(0.5)
            result["rss_per_stream_kb"] = (vmrss_kb(os.getpid()) - before) / streams
            if before_snapshot is not None:
                gc.collect()
                diff = tracemalloc.take_snapshot().compare_to(before_snapshot, "filename")
                tracemalloc.stop()
                result["traced_bytes_per_stream"] = sum(s.size_diff for s in diff) / streams
                result["top"] = [
                    {
                        "file": stat.traceback[0].filename,
                        "bytes_per_stream": stat.size_diff / streams,
                        "objects_per_stream": stat.count_diff / streams,
                    }
                    for stat in diff[:top]
                ]
            await js.publish(subjects.app_status(HALL), payload(1))
            for worker in workers:
                await worker.expect("k")  # the change reached every stream
            result["closed"] = sum([(await worker.close())["lost"] for worker in workers])
    return result


def format_result(result: dict) -> str:
    lines = [f"RSS growth per stream: {result['rss_per_stream_kb']:.2f} KB"]
    if "top" in result:
        per = result["traced_bytes_per_stream"]
        lines.append(f"tracemalloc: {per:.0f} bytes of Python objects per stream")
        lines += [
            f"{row['bytes_per_stream']:8.0f} B {row['objects_per_stream']:6.2f} objects  "
            f"{row['file']}"
            for row in result["top"]
        ]
    n, closed = result["streams"], result["closed"]
    lines.append(f"a change reached all {n} streams; {closed} closed at the end")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sse_memory", description=__doc__)
    parser.add_argument("streams", type=int, nargs="?", default=2000)
    parser.add_argument("--trace", action="store_true", help="tracemalloc's top files too")
    parser.add_argument("--top", type=int, default=12, help="how many files --trace lists")
    parser.add_argument("--uvloop", action="store_true", help="run the gateway on uvloop")
    args = parser.parse_args()
    coro = measure(args.streams, args.trace, args.top)
    if args.uvloop:
        import uvloop

        result = uvloop.run(coro)
    else:
        result = asyncio.run(coro)
    print(format_result(result), flush=True)


if __name__ == "__main__":
    main()
