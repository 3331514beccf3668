"""Helpers the tests share that are not fixtures: paths, settings, a bounded wait, a
sampled peak, a metrics parser.

Fixtures live in the `conftest.py` of the area that uses them; nothing here
starts a server.
"""

import asyncio
import contextlib
import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from dispatcher import waits
from dispatcher.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
APPS = ROOT / "tests" / "apps"  # small apps and models the tests run


def free_port() -> int:
    """A port free on 127.0.0.1 now (for a server a test starts and must name in advance)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_settings(tmp_path, nats_url: str) -> Settings:
    """Settings for a test against `nats_url`, with timings in fractions of a second."""
    s = Settings(data_dir=tmp_path / "data", log_format="console", log_level="warning")
    s.nats.url = nats_url
    s.handlers.ack_wait_s = 2.0
    s.handlers.shutdown_grace_s = 2.0
    s.reaper.interval_s = 0.2
    s.reaper.reconcile_grace_s = 0.5
    s.backend.local.stop_grace_s = 1.0
    s.gateway.port = 0
    return s


async def wait_for(
    predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "condition"
):
    """`dispatcher.waits.until`, failing the test (AssertionError) when it times out."""
    try:
        return await waits.until(predicate, timeout, interval_s=interval, what=what)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Peak:
    """The most a count was seen at (see `peak`)."""

    most = 0


@contextlib.asynccontextmanager
async def peak(count: Callable[[], Awaitable[int]], every_s: float = 0.01) -> AsyncIterator[Peak]:
    """Sample `count()` every `every_s` while the block runs; `.most` is the highest seen."""
    seen = Peak()

    async def sample() -> None:
        while True:
            seen.most = max(seen.most, await count())
            await asyncio.sleep(every_s)

    sampler = asyncio.create_task(sample(), name="peak-sampler")
    try:
        yield seen
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text format, strictly: every line is HELP, TYPE or a well-formed sample."""
    samples, typed = {}, {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert len(line.split(" ", 3)) == 4, line
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram"), line
            typed[name] = kind
        else:
            m = SAMPLE.match(line)
            assert m, line
            name, labels, value = m.groups()
            pairs = LABEL.findall(labels or "")
            assert ",".join(f'{k}="{v}"' for k, v in pairs) == (labels or ""), line
            family = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in typed or family in typed, f"{name} has no TYPE line"
            samples[(name, frozenset(pairs))] = float(value)
    return samples


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        children.setdefault(int(fields[1]), []).append(int(proc.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


async def run_cli(*args: str, stdin: str = "", **env: str) -> tuple[int, str, str]:
    """`spinyard ARGS` in a subprocess with only the `SPINYARD_*` settings in `env`, `stdin`
    on its standard input: (exit code, stdout, stderr)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPINYARD_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher.cli",
        *args,
        cwd=ROOT,
        env=clean | {"PYTHONPATH": str(ROOT)} | env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate(stdin.encode())
    return proc.returncode, out.decode(), err.decode()
