"""The CLI's answers to configuration mistakes: one line that names the fix, exit code 2."""

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp

from tests.backends.local.procs import kill_left_processes
from tests.helpers import ROOT, wait_for


def spinyard(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPINYARD_")}
    return subprocess.run(
        [sys.executable, "-m", "dispatcher.cli", *args],
        cwd=ROOT,
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_unreachable_nats_is_one_clear_line():
    out = spinyard(
        "apps",
        "list",
        SPINYARD_NATS__URL="nats://127.0.0.1:1",
        SPINYARD_NATS__CONNECT_TIMEOUT_S="1",
    )
    assert out.returncode == 2
    assert "error: cannot reach NATS at nats://127.0.0.1:1" in out.stderr
    assert "SPINYARD_NATS__URL" in out.stderr and "Traceback" not in out.stderr


def test_a_service_stops_waiting_for_nats_after_the_startup_wait(tmp_path):
    out = spinyard(
        "handlers",
        "heartbeat",
        SPINYARD_NATS__URL="nats://127.0.0.1:1",
        SPINYARD_NATS__STARTUP_WAIT_S="1.5",
        SPINYARD_NATS__CONNECT_TIMEOUT_S="0.5",
        SPINYARD_DATA_DIR=str(tmp_path),
        SPINYARD_GATEWAY__PUBLIC_URL="http://127.0.0.1:9",
    )
    assert out.returncode == 2
    assert "cannot reach NATS" in out.stderr
    assert "nats_error" in out.stderr  # each failed try is logged while it waits


def test_a_bad_setting_names_the_variable():
    out = spinyard("apps", "list", SPINYARD_GATEWAY__PORT="eighty")
    assert out.returncode == 2
    assert "SPINYARD_GATEWAY__PORT" in out.stderr and "Traceback" not in out.stderr


def test_a_state_dir_others_may_write_is_one_clear_line(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    out = spinyard(
        "up",
        SPINYARD_DATA_DIR=str(tmp_path / "data"),
        SPINYARD_BACKEND__LOCAL__STATE_DIR=str(shared),
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"error: backend.local.state_dir {shared} is writable by others" in out.stderr
    assert "name a directory of your own" in out.stderr
    assert kill_left_processes(tmp_path / "data") == []


def test_the_gateway_refuses_to_start_without_a_key():
    out = spinyard("gateway")
    assert out.returncode == 2
    assert "SPINYARD_AUTH__HS256_SECRET" in out.stderr and "Traceback" not in out.stderr


def test_unknown_handler_kind_lists_the_known_ones(tmp_path):
    out = spinyard(
        "handlers",
        "nope",
        SPINYARD_DATA_DIR=str(tmp_path),
        SPINYARD_GATEWAY__PUBLIC_URL="http://127.0.0.1:9",
    )
    assert out.returncode == 2
    assert "no handler 'nope'" in out.stderr and "page_load" in out.stderr


def _start(*args: str, **env: str) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SPINYARD_")}
    return subprocess.Popen(
        [sys.executable, "-m", "dispatcher.cli", *args],
        cwd=ROOT,
        env=clean | env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(proc: subprocess.Popen) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


async def test_handlers_and_gateway_as_separate_processes_serve_a_page_load(nats_server, tmp_path):
    """The scale-out shape: `spinyard handlers` and `spinyard gateway` on their own, composed
    by the same root as `spinyard up`; a free gateway port (0) still gives working app URLs."""
    env = {
        "SPINYARD_NATS__URL": nats_server.url,
        "SPINYARD_DATA_DIR": str(tmp_path / "data"),
        "SPINYARD_AUTH__ENABLED": "false",
        "SPINYARD_LOG_FORMAT": "json",
    }
    gateway = _start("gateway", **env, SPINYARD_GATEWAY__PORT="0")
    handlers = _start("handlers", "page_load", **env, SPINYARD_GATEWAY__PUBLIC_URL="http://x")
    try:
        added = spinyard("apps", "add", "examples/hello/spinyard.yaml", **env)
        assert added.returncode == 0, added.stderr
        line = await asyncio.wait_for(asyncio.to_thread(gateway.stdout.readline), 30)
        assert line.startswith("gateway listening on http://127.0.0.1:"), line
        url = line.split(" on ", 1)[1].strip()
        assert not url.endswith(":0")
        async with aiohttp.ClientSession() as http:
            event = {"type": "page_load", "app": "demo/hello", "session": "s-1"}

            async def accepted():  # 503 says "try again": the bus may still be settling
                async with http.post(f"{url}/v1/events", json=event) as resp:
                    assert resp.status in (202, 503), await resp.text()
                    return resp.status == 202

            await wait_for(accepted, timeout=20, what="the page load accepted")

            async def ready():
                async with http.get(f"{url}/v1/apps/demo/hello/status") as resp:
                    return resp.status == 200 and (await resp.json()).get("state") == "ready"

            await wait_for(ready, timeout=30, what="demo/hello ready through the gateway")
    finally:
        codes = [_stop(gateway), _stop(handlers)]
        spinyard_stop = spinyard("apps", "rm", "demo/hello", **env)
        kill_left_processes(tmp_path / "data")  # handlers leave their instances running
    assert [code for code, _ in codes] == [0, 0], [err[-2000:] for _, err in codes]
    assert spinyard_stop.returncode == 0


def test_a_gateway_without_handlers_says_to_start_them(nats_server, tmp_path):
    out = spinyard(
        "gateway",
        SPINYARD_NATS__URL=nats_server.url,
        SPINYARD_NATS__STARTUP_WAIT_S="0.5",
        SPINYARD_AUTH__ENABLED="false",
        SPINYARD_DATA_DIR=str(tmp_path),
    )
    assert out.returncode == 2
    assert "start `spinyard handlers`" in out.stderr and "Traceback" not in out.stderr
