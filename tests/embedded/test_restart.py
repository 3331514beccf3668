"""`spinyard up`, stopped and started again on the same data dir, serves pooled apps.

The first run leaves a ready shared deployment, a ready per-session one and
a full warm pool in the KV; it is killed with everything it started, so
nothing is cleaned up (as after a crash). The second run
must serve page loads of the pooled app (and the shared one) from live
instances: every page load reaches `ready`, none `failed`, and every page
answers.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from tests.embedded.test_up import alive, descendants
from tests.helpers import ROOT, free_port, wait_for
from tests.upstack import EXAMPLES, start_up, stop_up


class Up:
    """One `spinyard up --apps examples/hello` on `data`, its banner read."""

    def __init__(self, data: Path, port: int):
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPINYARD_")}
        env |= {
            "SPINYARD_DATA_DIR": str(data),
            "SPINYARD_REAPER__INTERVAL_S": "0.5",
            "SPINYARD_LOG_FORMAT": "json",
        }
        argv = [sys.executable, "-m", "dispatcher.cli", "up", "--port", str(port)]
        argv += ["--apps", str(ROOT / "examples" / "hello")]
        with open(data / "up.log", "ab") as log:
            self.proc = subprocess.Popen(
                argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True
            )
        banner = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("Press Ctrl-C" in b for b in banner):
            line = self.proc.stdout.readline()
            if not line:
                break
            banner.append(line)
        found = re.search(r"token:\s+(\S+)", "".join(banner))
        if found is None:
            self.stop()
            log = (data / "up.log").read_text()[-3000:]
            raise AssertionError(f"spinyard up did not start:\n{''.join(banner)}\n{log}")
        self.url = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"Bearer {found.group(1)}"}

    async def load(self, http: aiohttp.ClientSession, app: str, session: str) -> list[dict]:
        """A page load as embed.js makes it: status stream first, then the event. The
        statuses from the page load's acceptance on, up to `ready` or an ended state."""
        accept = self.headers | {"Accept": "text/event-stream"}
        url = f"{self.url}/v1/apps/{app}/status"
        async with http.get(url, params={"session": session}, headers=accept) as sse:
            assert sse.status == 200
            event = {"type": "page_load", "app": app, "session": session}
            async with http.post(f"{self.url}/v1/events", headers=self.headers, json=event) as r:
                assert r.status == 202
                accepted = (await r.json())["time"]
            seen = []
            async for raw in sse.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                status = json.loads(line[5:])
                if status["time"] < accepted:
                    continue  # history from before this page load (embed.js skips it too)
                seen.append(status)
                if status["state"] in ("ready", "failed", "stopped"):
                    return seen
        raise AssertionError(f"the status stream of {app} ended: {seen}")

    def stop(self) -> set[int]:
        """SIGTERM, as a service manager stops it (it then stops what it started)."""
        tree = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        return tree

    def crash(self) -> set[int]:
        """SIGKILL `up` and every process below it at once: nothing is cleaned up."""
        tree = descendants(self.proc.pid) | {self.proc.pid}
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()
        return tree


def pooled_instances(data: Path) -> set[str]:
    """The local backend's warm pool instances, from its state files."""
    found = set()
    for path in (data / "local" / "instances").glob("*.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if state.get("pooled"):
            found.add(state["id"])
    return found


async def test_a_restarted_up_serves_pooled_apps_and_none_fail(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()  # both runs on one port, as `./just up` twice
    first = Up(data, port)
    try:
        async with aiohttp.ClientSession() as http:
            for app, session in (("demo/classroom", "before"), ("demo/hello", "before")):
                seen = await first.load(http, app, session)
                assert seen[-1]["state"] == "ready", seen
            await wait_for(
                lambda: len(pooled_instances(data)) == 2, timeout=60, what="a full warm pool"
            )
    finally:
        tree = first.crash()  # the apps die, their records stay
    await wait_for(lambda: not alive(tree), timeout=15, what="the first run's processes gone")
    left = pooled_instances(data)
    assert len(left) == 2  # the KV and the state files still list them

    second = Up(data, port)
    try:
        async with aiohttp.ClientSession() as http:
            loads = [("demo/classroom", s) for s in ("before", "c-1", "c-2", "c-3")]
            loads.append(("demo/hello", "before"))
            for app, session in loads:
                seen = await second.load(http, app, session)
                states = [s["state"] for s in seen]
                assert states[-1] == "ready" and "failed" not in states, (app, session, seen)
                ready = seen[-1]  # (a refill the crash cut short may restart a listed id)
                async with http.get(ready["url"]) as page:
                    assert page.status == 200, (app, session, ready["url"])
                    assert ready["instance"] in await page.text()
    finally:
        tree = second.stop()
    await wait_for(lambda: not alive(tree), timeout=15, what="the second run's processes gone")


async def test_apps_registered_earlier_are_kept_and_named_or_removed_with_fresh(tmp_path):
    hello, epidemic = EXAMPLES
    first = start_up(tmp_path, {}, apps=(hello, epidemic))
    stop_up(first)
    assert "kept:" not in first["banner"]

    second = start_up(tmp_path, {}, apps=(hello,))
    try:
        assert "demo/epidemic (registered earlier; --fresh removes them)" in second["banner"]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{second['url']}/v1/apps") as r:
                assert "demo/epidemic" in {app["name"] for app in await r.json()}
    finally:
        stop_up(second)

    third = start_up(tmp_path, {}, apps=(hello,), args=("--fresh",))
    try:
        assert "removed: demo/epidemic" in third["banner"]
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{third['url']}/v1/apps") as r:
                names = {app["name"] for app in await r.json()}
        assert "demo/epidemic" not in names and "demo/hello" in names
    finally:
        stop_up(third)
