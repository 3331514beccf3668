"""The gateway bench's `spinyard up` variant: the load phase against the whole stack in one
process tree (nats-server, S3 server, handlers and gateway sharing one event loop).

`spinyard up --apps examples/hello` registers the app as `demo/hello` and serves
Prometheus metrics (the handlers' too) on the gateway's `/metrics`. Its NATS has
passwords, so the backlog here is accepted minus settled, read from `/metrics`.

Run on its own (the `up` phase only, for iterating on it):

    python -m bench.gateway_up                      # 32 viewers, 5 s
    python -m bench.gateway_up --viewers 32 --seconds 15 --json up.json

It prints the `spinyard up` process's PID first (`py-spy record --pid PID
--subprocesses ...` takes its nats-server too), and the CPU the `up` process and
its nats-server spent per accepted event, from the load's start until its backlog
drained (/proc/<pid>/stat): steadier than events/s on a shared machine.
"""

import argparse
import asyncio
import json
import os
import sys
import tempfile
from contextlib import AsyncExitStack
from dataclasses import asdict, replace
from pathlib import Path

import aiohttp

from bench import stats
from bench.gateway import (
    FULL,
    HELLO_SPEC,
    LOAD_COLUMNS,
    SECRET,
    UP_APP,
    Sizes,
    event,
    load_level,
)  # fmt: skip
from bench.stack import Process, clean_env, free_port, wait_until
from bench.viewers import SseStream, answers, post
from dispatcher.gateway.auth import mint

# The `spinyard up` row adds CPU per accepted event of its process, its nats-server and the
# bench's clients (bench/gateway_up.py).
UP_COLUMNS = (
    *LOAD_COLUMNS,
    ("up CPU ms/event", "up_cpu_ms_per_event"),
    ("nats CPU ms/event", "nats_cpu_ms_per_event"),
    ("bench CPU ms/event", "bench_cpu_ms_per_event"),
)


def nats_server_pid(parent: int) -> int | None:
    """The nats-server `spinyard up` (`parent`) started, if it is running."""
    for task in Path(f"/proc/{parent}/task").iterdir():
        for child in (task / "children").read_text().split():
            if Path(f"/proc/{child}/comm").read_text().strip() == "nats-server":
                return int(child)
    return None


async def up_load(tmp: Path, sizes: Sizes, started=lambda pid: None) -> dict:
    """`spinyard up` (nats-server, S3, handlers and gateway in one process tree) under
    `sizes.up_viewers` viewers, with the raw aiohttp peer as its baseline.

    `started(pid)` is called with the `up` process's PID once it answers."""
    async with AsyncExitStack() as stack:
        port, peer_port = free_port(), free_port()
        url, peer_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{peer_port}"
        env = clean_env({
            "SPINYARD_DATA_DIR": str(tmp / "up-data"), "SPINYARD_AUTH__HS256_SECRET": SECRET,
            "SPINYARD_LOG_LEVEL": "warning", "SPINYARD_LOG_FORMAT": "json",
        })  # fmt: skip
        argv = [sys.executable, "-m", "dispatcher.cli", "up", "--apps", str(HELLO_SPEC.parent)]
        up = Process("spinyard up", [*argv, "--port", str(port)], env, tmp / "up.log", group=True)
        stack.callback(up.start().stop)
        peer = Process(
            "raw aiohttp peer",
            [sys.executable, "-m", "bench.gateway_peer", str(peer_port)],
            clean_env({}),
            tmp / "up-peer.log",
        ).start()
        stack.callback(peer.stop)
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        stack.push_async_callback(http.close)
        for proc, health_url in ((up, f"{url}/healthz"), (peer, f"{peer_url}/status")):
            await wait_until(lambda p=proc, u=health_url: answers(http, p, u), 60.0, proc.name)
        started(up.proc.pid)
        token = mint(SECRET, [UP_APP], session="s-bench", ttl_s=3600)
        auth = {"Authorization": f"Bearer {token}", "Origin": url}
        sse = SseStream()
        stack.push_async_callback(sse.close)
        await post(http, f"{url}/v1/events", event("page_load", "s-bench", UP_APP), auth)
        await sse.open(http, f"{url}/v1/apps/{UP_APP}/status", auth)
        await sse.next(lambda s: s.get("state") == "ready")  # warm before the load
        pids = {"up": up.proc.pid, "nats": nats_server_pid(up.proc.pid), "bench": os.getpid()}
        level = await load_level(
            http, None, url, f"{url}/metrics", peer_url, sizes.up_viewers, sizes,
            {name: pid for name, pid in pids.items() if pid},
        )  # fmt: skip
        up.check()
        return level


async def run(sizes: Sizes, started=lambda pid: None) -> dict:
    """The `up` phase alone; `started(pid)` as in `up_load`."""
    machine = stats.machine()
    with tempfile.TemporaryDirectory(prefix="spinyard-bench-up-") as tmp:
        level = await up_load(Path(tmp), sizes, started)
    return {
        "bench": "gateway_up",
        "machine": machine,
        "loadavg_1m_end": stats.machine()["loadavg_1m"],
        "sizes": asdict(sizes),
        "up": level,
    }


def format_result(result: dict) -> str:
    return "\n".join([
        f"spinyard up, {result['sizes']['up_viewers']} viewers, "
        f"{result['sizes']['load_s']:g} s (raw: the aiohttp peer, same clients, just before)",
        stats.table([result["up"]], UP_COLUMNS),
        stats.load_line(result),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gateway_up", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--viewers", type=int, default=FULL.up_viewers, help="default: 32")
    parser.add_argument("--seconds", type=float, default=FULL.load_s, help="of load; default 5")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the result here")
    args = parser.parse_args(argv)
    sizes = replace(FULL, up_viewers=args.viewers, load_s=args.seconds)
    result = asyncio.run(run(sizes, lambda pid: print(f"spinyard up pid {pid}", flush=True)))
    level = result["up"]
    print(format_result(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0 if level["settled"] == level["accepted"] and not level["dead_lettered_total"] else 1


if __name__ == "__main__":
    sys.exit(main())
