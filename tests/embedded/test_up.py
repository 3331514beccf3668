"""`spinyard up` as a user runs it: a subprocess, its printed token, the gateway, a killed
nats-server, Ctrl-C and SIGTERM.

One stack serves most of the module (start-up costs a second or two); each
test uses its own session or app. Ctrl-C gets a stack of its own.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import ROOT, alive, descendants, parse_metrics, wait_for


@pytest.fixture(scope="module")
def stack(launch_up):
    # A killed nats-server comes back after 1.5 s, long enough to see the outage and to
    # publish into it (test_a_killed_nats_server_comes_back_and_nothing_is_lost).
    return launch_up(SPINYARD_EMBEDDED__NATS_RESTART_DELAY_S="1.5")


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


def nats_server_pid(up_pid: int) -> int | None:
    for pid in alive(descendants(up_pid)):
        try:
            argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if argv0.endswith(b"nats-server"):
            return pid
    return None


async def request(http, stack, event: dict) -> dict:
    async with http.post(f"{stack['url']}/v1/events", headers=auth(stack), json=event) as r:
        assert r.status == 202, await r.text()
        return await r.json()


async def status_is(http, stack, path: str, states: set[str]) -> dict | None:
    async with http.get(f"{stack['url']}{path}", headers=auth(stack)) as r:
        if r.status != 200:
            return None
        status = await r.json()
    assert status["state"] not in ("failed", "timed_out", "cancelled"), status
    return status if status["state"] in states else None


async def nats_connected(http, stack) -> bool:
    async with http.get(f"{stack['url']}/healthz") as r:
        return (await r.json())["nats"]


async def test_a_killed_nats_server_comes_back_and_nothing_is_lost(stack, http):
    """SIGKILL the embedded nats-server: `up` starts it again on the same port and store,
    says so once, and page loads and runs requested before, during and after all succeed.

    "During" is while the gateway's connection is down (its /healthz says so): the
    client holds those requests until it has reconnected. (A request already on the wire
    when the server dies gets no answer; the gateway says 503 after the NATS timeout.)
    """
    proc = stack["proc"]
    old = nats_server_pid(proc.pid)
    assert old is not None
    run = {"type": "run_request", "app": "demo/epidemic", "inputs": {"days": 30}}
    jobs, sessions = [], []

    async def both(tag: str) -> None:
        sessions.append(f"nats-{tag}")
        jobs.append((await request(http, stack, run | {"session": f"nats-{tag}"}))["job_id"])
        event = {"type": "page_load", "app": "demo/classroom", "session": f"nats-{tag}"}
        await request(http, stack, event)

    await both("before")
    os.kill(old, signal.SIGKILL)

    async def disconnected() -> bool:
        return not await nats_connected(http, stack)

    await wait_for(disconnected, timeout=10, what="the gateway to lose NATS")
    await both("during")
    new = await wait_for(
        lambda: (pid := nats_server_pid(proc.pid)) != old and pid, timeout=10, what="a new one"
    )
    await wait_for(lambda: nats_connected(http, stack), timeout=10, what="NATS back")
    await both("after")
    for job_id in jobs:
        await wait_for(
            lambda path=f"/v1/jobs/{job_id}/status": status_is(http, stack, path, {"succeeded"}),
            timeout=60,
            what=f"run {job_id} succeeded",
        )
    for session in sessions:
        path = f"/v1/apps/demo/classroom/status?session={session}"
        await wait_for(
            lambda path=path: status_is(http, stack, path, {"ready"}),
            timeout=60,
            what=f"{session} ready",
        )
    restarts = [
        json.loads(line)
        for line in stack["log"].read_text().splitlines()
        if '"nats_server_restarted"' in line
    ]
    assert len(restarts) == 1, restarts
    assert restarts[0]["level"] == "warning" and restarts[0]["exit_code"] == -signal.SIGKILL
    banner_port = int(re.search(r"NATS:\s+nats://\S+:(\d+)", stack["banner"]).group(1))
    assert restarts[0]["port"] == banner_port
    assert proc.poll() is None and nats_server_pid(proc.pid) == new

    # A handler whose KV request died with the server waits out its timeout and retries:
    # let that finish here, not in the next test.
    async def idle() -> bool:
        async with http.get(f"{stack['url']}/metrics") as r:
            samples = parse_metrics(await r.text())
        return not any(v for (n, _), v in samples.items() if n == "spinyard_handler_inflight")

    await wait_for(idle, timeout=30, what="no message in flight")


def quiet_after(log: Path, offset: int, signalled: float) -> None:
    """Assert `up` logged nothing of its own stopping: after `signalled`, only info lines
    already on their way when the signal came (up to 1 s: the loop may be busy, on a
    loaded machine, before it runs the signal handler); no warning, no traceback."""
    for line in log.read_bytes()[offset:].decode().splitlines():
        entry = json.loads(line)
        at = datetime.fromisoformat(entry["timestamp"].replace("Z", "+00:00")).timestamp()
        if at < signalled:
            continue  # before the stop: what the stack was doing anyway
        assert entry["level"] == "info" and "exception" not in entry, line
        assert at < signalled + 1.0, line


async def stops_cleanly(stack, http, session: str, send_signal) -> None:
    """Start an app under `up`, signal it with `send_signal(proc)`: it exits 0 with one
    line, logs nothing of its stopping and leaves no process behind."""
    proc = stack["proc"]
    # Make sure app processes exist, so there is something to clean up.
    async with http.post(
        f"{stack['url']}/v1/events",
        headers=auth(stack),
        json={"type": "page_load", "app": "demo/hello", "session": session},
    ) as r:
        assert r.status == 202
    tree = await wait_for(
        lambda: descendants(proc.pid) if len(descendants(proc.pid)) >= 2 else None,
        timeout=20,
        what="nats-server and an app running under up",
    )
    logged, signalled = stack["log"].stat().st_size, time.time()
    send_signal(proc)
    assert proc.wait(30) == 0
    assert proc.stdout.read() == "spinyard stopped\n"
    quiet_after(stack["log"], logged, signalled)
    await wait_for(lambda: not alive(tree), timeout=10, what=f"no process left of {tree}")


async def test_sigterm_stops_everything_and_leaves_no_process(stack, http):
    await stops_cleanly(stack, http, "last", lambda proc: proc.send_signal(signal.SIGTERM))


async def test_ctrl_c_stops_everything_with_one_line(launch_up, http):
    """A terminal's Ctrl-C signals the whole foreground process group, not just `up`."""
    await stops_cleanly(
        launch_up(), http, "ctrl-c", lambda proc: os.killpg(proc.pid, signal.SIGINT)
    )
