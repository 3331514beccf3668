"""The local process backend: the shared backend contract, then what only it does."""

import asyncio
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import aiohttp
import pytest
import structlog

from dispatcher.backends.local.backend import LocalBackend
from dispatcher.compose import make_backend
from dispatcher.settings import Settings
from handlers.errors import StartFailed
from schemas import errors as codes
from schemas.spec import AppSpec
from tests.backends.contract import (
    ECHO_APP,
    READY_S,
    BackendContract,
    JobContract,
    WarmJobContract,
    echo_spec,
    find,
    new_id,
)
from tests.backends.local import procs
from tests.backends.local.procs import PUBLIC_URL
from tests.helpers import ROOT, wait_for


async def _get(url: str, **kwargs) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as http, http.get(url, **kwargs) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def _info(backend: LocalBackend, instance_id: str, spec: AppSpec) -> dict:
    _, base = await backend.target(instance_id)
    status, _, body = await _get(f"{base}/apps/{spec.name}/{instance_id}/api/info")
    assert status == 200
    return json.loads(body)


class TestLocalBackend(BackendContract, JobContract, WarmJobContract):
    @pytest.fixture
    def new_backend(self, local_settings, data_dir):
        return lambda: LocalBackend(local_settings, data_dir, PUBLIC_URL)

    @pytest.fixture
    def running_copies(self):
        async def count(instance_id: str) -> int:
            return procs.running_copies(instance_id)

        return count

    @pytest.fixture
    def running_job_copies(self):
        async def count(job_id: str) -> int:
            return procs.running_copies(job_id, "SPINYARD_JOB_ID")

        return count

    # -- how an app is started --

    async def test_placeholders_env_and_workdir_reach_the_app(self, backend, tmp_path, monkeypatch):
        monkeypatch.setenv("SPINYARD_STORE__SECRET_KEY", "must-not-leak")
        workdir = tmp_path / "wd"
        workdir.mkdir()
        spec = AppSpec(
            name="test/env",
            command=["{python}", str(ECHO_APP), "--tag", "{host}:{port} {other} {python}"],
            env={"APP_WHERE": "{host}:{port}{prefix}", "APP_PLAIN": "{x}"},
            workdir=str(workdir),
            entry_path="main",
        )
        iid = new_id()
        await backend.start_viz(iid, spec)
        await backend.wait_ready(iid, spec, READY_S)

        prefix = f"/apps/test/env/{iid}/"
        info = await _info(backend, iid, spec)
        port = info["port"]
        assert (await backend.target(iid)) == ("test/env", f"http://127.0.0.1:{port}")
        assert info["prefix"] == prefix
        assert info["cwd"] == str(workdir)
        assert info["tag"] == f"127.0.0.1:{port} {{other}} {sys.executable}"
        assert info["env"] == {
            "SPINYARD_PORT": str(port),
            "SPINYARD_PREFIX": prefix,
            "SPINYARD_INSTANCE": iid,
            "SPINYARD_APP": "test/env",
            "APP_WHERE": f"127.0.0.1:{port}{prefix}",
            "APP_PLAIN": "{x}",
        }
        assert backend.url(iid, spec) == f"http://gateway.test:8080{prefix}main"

    async def test_the_apps_output_goes_to_its_log_file(self, backend, data_dir):
        spec, iid = echo_spec(), new_id()
        await backend.start_viz(iid, spec)
        await backend.wait_ready(iid, spec, READY_S)
        log = data_dir / "local" / "logs" / f"{iid}.log"
        await wait_for(lambda: b"echo_app: listening" in log.read_bytes(), what="the log line")

    async def test_exit_reports_code_and_log_tail(self, backend):
        spec = AppSpec(
            name="test/exit",
            command=["{python}", "-c", "import sys; print('boom at start'); sys.exit(3)"],
        )
        iid = new_id()
        await backend.start_viz(iid, spec)
        with pytest.raises(StartFailed) as failed:
            await backend.wait_ready(iid, spec, READY_S)
        assert failed.value.code == codes.START_FAILED
        assert failed.value.message == "the app exited with code 3 before it was ready"
        assert failed.value.log_tail == "boom at start"

    async def test_missing_command_or_workdir_fails_at_start(self, backend, tmp_path):
        missing = AppSpec(name="test/missing", command=[str(tmp_path / "no-such-program")])
        with pytest.raises(StartFailed, match="could not run") as failed:
            await backend.start_viz(new_id(), missing)
        assert failed.value.code == codes.START_FAILED
        nowhere = echo_spec(workdir=str(tmp_path / "nowhere"))
        with pytest.raises(StartFailed, match="working directory"):
            await backend.start_viz(new_id(), nowhere)

    @pytest.mark.parametrize("status", [200, 204, 302, 399])
    async def test_an_answer_of_200_to_399_is_ready(self, backend, status):
        spec, iid = echo_spec(readiness_path=f"/status/{status}"), new_id()
        await backend.start_viz(iid, spec)
        await backend.wait_ready(iid, spec, READY_S)

    @pytest.mark.parametrize(
        ("status", "answer"),
        [(404, "404 Not Found"), (401, "401 Unauthorized"), (503, "503 Service Unavailable")],
    )
    async def test_any_other_answer_is_not_ready(self, backend, status, answer):
        spec, iid = echo_spec(readiness_path=f"/status/{status}"), new_id()
        await backend.start_viz(iid, spec)
        await backend.wait_ready(iid, echo_spec(), READY_S)  # it does listen
        with pytest.raises(StartFailed) as failed:
            await backend.wait_ready(iid, spec, 0.3)
        assert failed.value.code == codes.START_TIMEOUT
        assert failed.value.message == (
            f"the app did not become ready within 1 s: last answer to /status/{status}: {answer}"
        )

    async def test_an_app_without_its_base_path_times_out_with_the_answer_and_log(self, backend):
        """The app ignores its prefix (a missing base-path flag): every page is a 404,
        which used to count as ready and showed viewers a blank page."""
        spec = echo_spec()
        spec = spec.model_copy(
            update={"command": [*spec.command, "--prefix", "/"], "start_timeout_s": 1.4}
        )
        iid = new_id()
        await backend.start_viz(iid, spec)
        with pytest.raises(StartFailed) as failed:
            await backend.wait_ready(iid, spec, spec.start_timeout_s)
        assert failed.value.code == codes.START_TIMEOUT
        assert failed.value.message == (
            "the app did not become ready within 1 s: last answer to /: 404 Not Found"
        )
        tail = failed.value.log_tail  # the app logged each probe: the same line, shown once
        assert f'"GET /apps/test/echo/{iid}/ HTTP/1.1" 404' in tail
        assert tail.count(f'"GET /apps/test/echo/{iid}/ HTTP/1.1" 404') < 5
        assert len(tail.splitlines()) <= 10 and len(tail) <= 2048

    async def test_an_app_that_never_listens_names_the_refused_connection(self, backend):
        spec, iid = echo_spec("hang"), new_id()
        await backend.start_viz(iid, spec)
        with pytest.raises(StartFailed) as failed:
            await backend.wait_ready(iid, spec, 0.6)
        assert failed.value.message.endswith(": last answer to /: connection refused")

    async def test_ids_must_be_safe_file_names(self, backend):
        for bad in ("../../etc/passwd", "i-UPPER0000000000", ""):
            with pytest.raises(ValueError):
                await backend.start_viz(bad, echo_spec())
            with pytest.raises(ValueError):
                await backend.stop_viz(bad)
            assert await backend.target(bad) is None

    # -- processes that die, linger or are not ours --

    async def test_a_crashed_app_is_restarted_by_the_next_start(self, backend, running_copies):
        spec, iid = echo_spec(), new_id()
        await backend.start_viz(iid, spec)
        await backend.wait_ready(iid, spec, READY_S)
        pid = int((await find(backend, iid)).labels["pid"])

        os.kill(pid, signal.SIGKILL)

        async def dead() -> bool:
            return (await find(backend, iid)).alive is False

        await wait_for(dead, what="the app to be seen dead")
        assert await backend.target(iid) is None
        assert procs.running_copies(iid) == 0

        await backend.start_viz(iid, spec)
        await backend.wait_ready(iid, spec, READY_S)
        instance = await find(backend, iid)
        assert instance.alive and int(instance.labels["pid"]) != pid
        assert await running_copies(iid) == 1

    async def test_a_claim_of_a_dead_pool_member_is_refused(self, backend):
        """As after `spinyard up` was restarted: the state file is there, the process is not."""
        spec, iid = echo_spec(), new_id()
        await backend.start_viz(iid, spec, pooled=True)
        await backend.wait_ready(iid, spec, READY_S)
        os.kill(int((await find(backend, iid)).labels["pid"]), signal.SIGKILL)

        async def dead() -> bool:
            return (await find(backend, iid)).alive is False

        await wait_for(dead, what="the app to be seen dead")
        assert await backend.claim(iid) is False
        assert (await find(backend, iid)).pooled is True  # nothing was marked

    async def test_stop_kills_the_group_after_the_grace(self, local_settings, data_dir):
        local_settings.stop_grace_s = 0.3
        backend = LocalBackend(local_settings, data_dir, PUBLIC_URL)
        script = textwrap.dedent("""
            import signal, subprocess, sys, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            print("stubborn", flush=True)
            time.sleep(600)
        """)
        spec, iid = AppSpec(name="test/stubborn", command=["{python}", "-c", script]), new_id()
        await backend.start_viz(iid, spec)
        log = data_dir / "local" / "logs" / f"{iid}.log"
        await wait_for(lambda: log.exists() and b"stubborn" in log.read_bytes(), what="startup")
        assert procs.running_copies(iid) == 2

        loop = asyncio.get_running_loop()
        started = loop.time()
        await backend.stop_viz(iid)
        assert loop.time() - started >= 0.3  # SIGTERM was ignored: killed after the grace
        assert procs.running_copies(iid) == 0
        assert await backend.list_instances() == []

    async def test_a_recycled_pid_is_not_ours(self, backend, data_dir):
        """A state file whose pid now belongs to another process: not alive, never signalled."""
        decoy = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
        )
        try:
            iid = new_id()
            path = data_dir / "local" / "instances" / f"{iid}.json"
            record = {
                "id": iid, "app": "test/decoy", "kind": "viz", "pid": decoy.pid,
                "start_time": procs.start_time(decoy.pid), "host": "127.0.0.1", "port": 9,
                "boot_id": procs.boot_id(),
                "pooled": False, "created_at": 1.0,
            }  # fmt: skip

            def write(**changes) -> None:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(record | changes))
                os.replace(tmp, path)

            write()
            assert (await find(backend, iid)).alive is True
            assert await backend.target(iid) == ("test/decoy", "http://127.0.0.1:9")

            write(start_time=record["start_time"] + 1)
            assert (await find(backend, iid)).alive is False
            assert await backend.target(iid) is None
            await backend.stop_viz(iid)
            assert not path.exists()
            assert decoy.poll() is None  # still running: it was never signalled
        finally:
            decoy.kill()
            decoy.wait()

    async def test_corrupt_state_files_are_skipped_and_logged_once(self, backend, data_dir):
        spec, iid = echo_spec(), new_id()
        await backend.start_viz(iid, spec)
        corrupt = data_dir / "local" / "instances" / f"{new_id()}.json"
        corrupt.write_text("{not json")
        with structlog.testing.capture_logs() as logs:
            assert [i.id for i in await backend.list_instances()] == [iid]
            assert [i.id for i in await backend.list_instances()] == [iid]
        unreadable = [e for e in logs if e["event"] == "instance_state_unreadable"]
        assert len(unreadable) == 1
        assert unreadable[0]["path"] == str(corrupt)

        await backend.stop_viz(corrupt.stem)
        assert not corrupt.exists()

    # -- many starters at once --

    async def test_concurrent_starts_from_two_backend_objects_run_one_copy(
        self, backends, running_copies
    ):
        one, two = await backends(), await backends()
        spec, iid = echo_spec(), new_id()
        await asyncio.gather(*(b.start_viz(iid, spec) for b in (one, two, one, two)))
        await asyncio.gather(one.wait_ready(iid, spec, READY_S), two.wait_ready(iid, spec, READY_S))
        assert await running_copies(iid) == 1

    async def test_concurrent_starts_from_processes_run_one_copy(
        self, backend, data_dir, tmp_path, running_copies
    ):
        """Handler processes share a data dir; they exit, and the app lives on."""
        script = textwrap.dedent("""
            import asyncio, sys, time
            from pathlib import Path
            from dispatcher.backends.local.backend import LocalBackend
            from dispatcher.backends.settings import LocalBackendSettings
            from tests.backends.contract import echo_spec

            backend = LocalBackend(LocalBackendSettings(), Path(sys.argv[1]), "http://x")
            print("ready", flush=True)
            while not Path(sys.argv[3]).exists():  # all start at once, to race for real
                time.sleep(0.0002)
            asyncio.run(backend.start_viz(sys.argv[2], echo_spec()))
        """)
        iid, go = new_id(), tmp_path / "go"
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-c", script, str(data_dir), iid, str(go), cwd=ROOT,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )
            for _ in range(4)
        ]  # fmt: skip
        for proc in procs:
            assert await asyncio.wait_for(proc.stdout.readline(), READY_S) == b"ready\n"
        go.touch()
        results = [await p.communicate() for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, results

        await backend.wait_ready(iid, echo_spec(), READY_S)
        assert await running_copies(iid) == 1
        assert len(await backend.list_instances()) == 1

    async def test_start_waits_for_the_instance_lock(self, backend, data_dir, running_copies):
        iid = new_id()
        lock = data_dir / "local" / "instances" / f"{iid}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # as another handler process would
            start = asyncio.create_task(backend.start_viz(iid, echo_spec()))
            done, _ = await asyncio.wait([start], timeout=0.3)
            assert not done
            assert await running_copies(iid) == 0
        finally:
            os.close(fd)
        await asyncio.wait_for(start, READY_S)
        await backend.wait_ready(iid, echo_spec(), READY_S)
        assert await running_copies(iid) == 1

    async def test_a_cancelled_wait_for_the_lock_does_not_keep_it(self, backend, data_dir):
        iid = new_id()
        lock = data_dir / "local" / "instances" / f"{iid}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            start = asyncio.create_task(backend.start_viz(iid, echo_spec()))
            await asyncio.wait([start], timeout=0.1)
            start.cancel()
            with pytest.raises(asyncio.CancelledError):
                await start
        finally:
            os.close(fd)
        await asyncio.wait_for(backend.claim(iid), READY_S)  # the lock is free again
        assert await backend.list_instances() == []


class TestEchoApp:
    """The test app itself, which end-to-end tests reuse."""

    @pytest.fixture
    async def app(self, local_settings, data_dir):
        backend = LocalBackend(local_settings, data_dir, PUBLIC_URL)
        spec, iid = echo_spec(), new_id()
        await backend.start_viz(iid, spec)
        await backend.wait_ready(iid, spec, READY_S)
        _, base = await backend.target(iid)
        yield base, f"/apps/test/echo/{iid}/", iid
        await backend.stop_viz(iid)
        await backend.cleanup()

    async def test_page_info_and_echo(self, app):
        base, prefix, iid = app
        status, headers, body = await _get(base + prefix)
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert iid.encode() in body and prefix.encode() in body

        status, headers, _ = await _get(base + prefix.rstrip("/") + "?a=1", allow_redirects=False)
        assert (status, headers["Location"]) == (308, prefix + "?a=1")
        assert (await _get(base + "/elsewhere/"))[0] == 404
        assert (await _get(base + prefix + "status/418"))[0] == 418

        async with (
            aiohttp.ClientSession() as http,
            http.post(base + prefix + "api/echo", data=b"\x00hi", headers={"X-A": "1"}) as resp,
        ):
            assert (resp.status, await resp.read()) == (200, b"\x00hi")
        status, _, body = await _get(base + prefix + "api/info?q=2", headers={"X-Test": "yes"})
        info = json.loads(body)
        assert (info["path"], info["query"], info["headers"]["X-Test"]) == (
            prefix + "api/info",
            "q=2",
            "yes",
        )

    async def test_websocket_echo(self, app):
        base, prefix, _ = app
        big = os.urandom(70_000)
        async with aiohttp.ClientSession() as http, http.ws_connect(base + prefix + "ws") as ws:
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "hello"
            await ws.send_bytes(big)
            assert (await ws.receive(timeout=5)).data == big
            await ws.close()
        assert ws.close_code == 1000

    async def test_sigterm_exits_zero(self, tmp_path):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(ECHO_APP), "--port", str(port), "--prefix", "p",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), READY_S)
            assert line.decode().strip() == f"echo_app: listening on http://127.0.0.1:{port}/p/"
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), READY_S)
            assert proc.returncode == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await proc.communicate()


# -- choosing the backend --


def test_make_backend_builds_the_local_backend(tmp_path):
    settings = Settings(data_dir=tmp_path)
    backend = make_backend(settings)
    assert isinstance(backend, LocalBackend) and backend.name == "local"
    assert backend.url("i-0123456789abcdef", echo_spec()).startswith("http://127.0.0.1:8080/apps/")

    settings.gateway.public_url = "https://apps.example.org/"
    url = make_backend(settings).url("i-0123456789abcdef", echo_spec())
    assert url == "https://apps.example.org/apps/test/echo/i-0123456789abcdef/"


def test_make_backend_needs_a_known_gateway_url(tmp_path):
    settings = Settings(data_dir=tmp_path)
    settings.gateway.port = 0
    with pytest.raises(ValueError, match="public_url"):
        make_backend(settings)
