"""The CLI's answers to configuration mistakes: one line that names the fix, exit code 2."""

import os
import subprocess
import sys

from tests.helpers import ROOT


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
