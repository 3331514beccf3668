"""`spinyard up` as a user runs it: a subprocess, its printed token, the gateway, SIGTERM.

One stack serves the module (start-up costs a second or two); each test
uses its own session or app.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import ROOT, free_port, parse_metrics, wait_for


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


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    data = tmp_path_factory.mktemp("up")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINYARD_")}
    env |= {
        "SPINYARD_DATA_DIR": str(data),
        "SPINYARD_REAPER__INTERVAL_S": "0.5",
        "SPINYARD_LOG_FORMAT": "json",
    }
    argv = [
        sys.executable,
        "-m",
        "dispatcher.cli",
        "up",
        "--port",
        str(port),
        "--apps",
        str(ROOT / "examples" / "hello"),
        "--apps",
        str(ROOT / "examples" / "epidemic"),
    ]
    with open(data / "up.log", "wb") as log:
        proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True
        )
    banner = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        banner.append(line)
        if line.startswith("Press Ctrl-C"):
            break
    text = "".join(banner)
    if "token:" not in text:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        raise AssertionError(
            f"spinyard up did not start:\n{text}\n{(data / 'up.log').read_text()[-3000:]}"
        )
    token = re.search(r"token:\s+(\S+)", text).group(1)
    yield {
        "proc": proc,
        "url": f"http://127.0.0.1:{port}",
        "token": token,
        "banner": text,
        "data": data,
    }
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    proc.stdout.close()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def auth(stack) -> dict:
    return {"Authorization": f"Bearer {stack['token']}"}


async def test_banner_names_the_demo_and_the_apps(stack):
    assert f"{stack['url']}/demo" in stack["banner"]
    assert "demo/hello" in stack["banner"] and "demo/epidemic" in stack["banner"]


async def test_one_metrics_endpoint_shows_the_gateway_and_the_handlers(stack, http):
    """`up` keeps one Prometheus registry for its process: /metrics has both families."""

    async def both():
        async with http.get(f"{stack['url']}/metrics") as r:
            assert r.status == 200
            samples = parse_metrics(await r.text())
        names = {name for name, _ in samples}
        return "spinyard_gateway_sse_clients" in names and any(
            name == "spinyard_handler_inflight" and dict(labels).get("handler") == "reaper_tick"
            for name, labels in samples
        )

    await wait_for(both, what="gateway and handler metrics on one /metrics")


async def test_page_load_over_the_gateway_reaches_ready_and_the_app_answers(stack, http):
    base = stack["url"]
    # SSE first: the current status, then each change.
    async with http.get(
        f"{base}/v1/apps/demo/hello/status", headers=auth(stack) | {"Accept": "text/event-stream"}
    ) as sse:
        assert sse.status == 200
        async with http.post(
            f"{base}/v1/events",
            headers=auth(stack),
            json={"type": "page_load", "app": "demo/hello", "session": "e2e-1"},
        ) as r:
            assert r.status == 202
        states, ready = [], None
        async for raw in sse.content:
            line = raw.decode().strip()
            if line.startswith("data:"):
                status = json.loads(line[5:])
                states.append(status["state"])
                if status["state"] == "ready":
                    ready = status
                    break
    assert ready is not None, states
    assert "starting" in states or ready["phases"]["warm"] is False
    async with http.get(ready["url"]) as page:
        assert page.status == 200
        assert ready["instance"] in await page.text()
        assert page.headers["Content-Security-Policy"] == "frame-ancestors 'self'"
    async with http.post(ready["url"] + "click") as click:
        assert (await click.json())["clicks"] >= 1


async def test_events_without_a_token_are_refused(stack, http):
    async with http.post(
        f"{stack['url']}/v1/events", json={"type": "page_load", "app": "demo/hello", "session": "x"}
    ) as r:
        assert r.status == 401
        assert (await r.json())["error"]["code"] == "unauthorized"


async def test_demo_page_and_dev_token_are_served(stack, http):
    async with http.get(f"{stack['url']}/demo") as r:
        assert r.status == 200 and "embed.js" in await r.text()
    async with http.get(f"{stack['url']}/v1/dev/token", params={"session": "s-7"}) as r:
        token = (await r.json())["token"]
    async with http.post(
        f"{stack['url']}/v1/events",
        headers={"Authorization": f"Bearer {token}"},
        json={"type": "page_load", "app": "demo/hello", "session": "s-7"},
    ) as r:
        assert r.status == 202


async def test_the_example_model_runs_and_its_results_download(stack, http):
    base = stack["url"]
    run = {
        "type": "run_request",
        "app": "demo/epidemic",
        "session": "e2e-run",
        "inputs": {"population": 1000, "infected": 5, "days": 60},
    }
    async with http.post(f"{base}/v1/events", headers=auth(stack), json=run) as r:
        assert r.status == 202
        job_id = (await r.json())["job_id"]
    url = f"{base}/v1/jobs/{job_id}/status"
    async with http.get(url, headers=auth(stack) | {"Accept": "text/event-stream"}) as sse:
        states, done = [], None
        async for raw in sse.content:
            line = raw.decode().strip()
            if line.startswith("data:"):
                status = json.loads(line[5:])
                states.append(status["state"])
                if status["state"] in ("succeeded", "failed", "timed_out", "cancelled"):
                    done = status
                    break
    assert done is not None and done["state"] == "succeeded", (states, done)
    assert states[-2:] == ["running", "succeeded"] or states == ["succeeded"]
    results = {r["name"]: r for r in done["results"]}
    assert set(results) == {"summary.json", "trajectory.csv"}
    async with http.get(results["summary.json"]["url"]) as r:
        summary = json.loads(await r.read())
    assert summary["inputs"]["days"] == 60 and summary["peak_infected"] > 5
    async with http.get(results["trajectory.csv"]["url"]) as r:
        assert (await r.text()).splitlines()[0] == "day,susceptible,infected,recovered"


async def test_embedded_nats_has_the_role_users_and_the_cli_env_works(stack):
    url = re.search(r"NATS:\s+nats://(\S+)", stack["banner"]).group(1)
    host, port = url.rsplit(":", 1)
    # An anonymous client, in NATS's own protocol: the server refuses it.
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        assert conn.recv(4096).startswith(b"INFO ")
        conn.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        assert b"Authorization Violation" in conn.recv(4096)
    env_file = stack["data"] / "cli.env"
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    env = dict(line.split("=", 1) for line in env_file.read_text().split())
    assert env["SPINYARD_NATS__USER"] == "admin"
    listed = cli(env, "apps", "list")
    assert listed.returncode == 0, listed.stderr
    assert "demo/hello" in listed.stdout
    # `spinyard token` with the same file mints a token this stack accepts.
    minted = cli(env, "token", "--app", "demo/hello", "--session", "cli")
    assert minted.returncode == 0, minted.stderr
    async with aiohttp.ClientSession() as http:
        event = {"type": "page_load", "app": "demo/hello", "session": "cli"}
        headers = {"Authorization": f"Bearer {minted.stdout.strip()}"}
        async with http.post(f"{stack['url']}/v1/events", json=event, headers=headers) as r:
            assert r.status == 202


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    """`spinyard ARGS` with only `env`'s SPINYARD_* settings, as from the sourced cli.env."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPINYARD_")}
    return subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", *args],
        cwd=ROOT,
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_sigterm_stops_everything_and_leaves_no_process(stack, http):
    proc = stack["proc"]
    # Make sure app processes exist, so there is something to clean up.
    async with http.post(
        f"{stack['url']}/v1/events",
        headers=auth(stack),
        json={"type": "page_load", "app": "demo/hello", "session": "last"},
    ) as r:
        assert r.status == 202
    tree = await wait_for(
        lambda: descendants(proc.pid) if len(descendants(proc.pid)) >= 2 else None,
        timeout=20,
        what="nats-server and an app running under up",
    )
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    await wait_for(lambda: not alive(tree), timeout=10, what=f"no process left of {tree}")
