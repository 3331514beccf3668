"""Jobs on the local backend: the hand-over, limits, runners that die, the watcher's socket.

The shared job contract runs in test_local_backend.py; these are what only
the local backend does, against real processes.
"""

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest

from dispatcher.backends.local import jobwatch, processes
from dispatcher.backends.local.backend import LocalBackend
from dispatcher.backends.local.jobfiles import JobDir, Listings
from dispatcher.backends.settings import LocalBackendSettings
from dispatcher.store import ObjectStore
from handlers.errors import StartFailed
from schemas.spec import AppSpec
from tests.backends.contract import (
    JOB_MODEL,
    JOB_S,
    JobWatch,
    find,
    job_spec,
    launch,
    new_job_id,
    stop_all,
)
from tests.backends.local import procs
from tests.backends.local.procs import PUBLIC_URL
from tests.helpers import ROOT, wait_for
from tests.s3 import store_settings


@pytest.fixture
async def backends(local_settings, data_dir):
    made: list[LocalBackend] = []

    async def make() -> LocalBackend:
        backend = LocalBackend(local_settings, data_dir, PUBLIC_URL)
        backend.takeover_s = 0.05
        await backend.setup()
        made.append(backend)
        return backend

    yield make
    await stop_all(made[-1])
    assert await made[-1].list_instances() == []
    for backend in made:
        await backend.cleanup()


@pytest.fixture
async def backend(backends) -> LocalBackend:
    return await backends()


@pytest.fixture
async def watch(backend):
    made: list[JobWatch] = []

    def start(on: LocalBackend | None = None) -> JobWatch:
        made.append(JobWatch(on or backend))
        return made[-1]

    yield start
    for watcher in made:
        await watcher.stop()


def job_dir(data_dir: Path, job_id: str) -> Path:
    return data_dir / "local" / "jobs" / job_id


async def seen_by_model(data_dir: Path, job_id: str) -> dict:
    """What the job model says it was handed (its first log line)."""
    log = job_dir(data_dir, job_id) / "job.log"

    def line() -> str | None:
        text = log.read_text() if log.exists() else ""
        return next((x for x in text.splitlines() if x.startswith("job_model: {")), None)

    found = await wait_for(line, JOB_S, what="the model's report")
    return json.loads(found.removeprefix("job_model: "))


def copies(job_id: str) -> int:
    return procs.running_copies(job_id, "SPINYARD_JOB_ID")


# -- the hand-over --


async def test_a_job_gets_its_inputs_uploads_and_env_and_no_secrets(
    backend, watch, data_dir, monkeypatch
):
    monkeypatch.setenv("SPINYARD_NATS__PASSWORD", "must-not-leak")
    monkeypatch.setenv("SPINYARD_STORE__SECRET_KEY", "must-not-leak")
    workdir = JOB_MODEL.parent
    spec = job_spec(
        deadline_s=30,
        env={"JOB_WHERE": "{python}", "JOB_PLAIN": "{x}"},
        workdir=str(workdir),
    ).model_copy(update={"command": ["{python}", JOB_MODEL.name, "--write", "--sleep", "600"]})
    jid, watcher = new_job_id(), watch()
    inputs = {"n": 3, "text": "é ✓", "nested": {"list": [1, 2]}}
    urls = {"out.csv": "http://store.test/put?sig=1", "sum.json": "http://store.test/put?sig=2"}
    await backend.submit_job(launch(jid, spec, inputs, upload_urls=urls), spec)
    await watcher.until(jid, "running")

    seen = await seen_by_model(data_dir, jid)
    here = job_dir(data_dir, jid)
    assert seen["stdin"] == seen["inputs"] == inputs
    assert seen["uploads"] == urls
    assert seen["env"] == {
        "SPINYARD_JOB_ID": jid,
        "SPINYARD_APP": spec.name,  # as on Kubernetes
        "SPINYARD_INPUTS": str(here / "inputs.json"),
        "SPINYARD_UPLOADS": str(here / "uploads.json"),
        "SPINYARD_OUTPUT_DIR": str(here / "work"),
        "SPINYARD_DEADLINE_S": "30",
        "JOB_WHERE": sys.executable,
        "JOB_PLAIN": "{x}",
    }
    assert seen["cwd"] == str(workdir)  # so the relative script path worked
    assert seen["modes"] == {
        "inputs": "0o600",
        "uploads": "0o600",
        "output_dir": "0o700",
        "job_dir": "0o700",
    }
    scratch = here / "work" / "scratch.txt"
    await wait_for(scratch.exists, what="the model's scratch file")
    assert scratch.read_text() == "hello"

    runner_pid = int((await find(backend, jid)).labels["pid"])
    with open(f"/proc/{runner_pid}/environ", "rb") as f:
        runner_env = f.read()
    assert b"SPINYARD_" not in runner_env  # the runner holds no credentials either
    for path in here.rglob("*"):
        if path.is_file():
            assert b"must-not-leak" not in path.read_bytes(), path


async def test_without_a_workdir_a_job_runs_in_its_output_dir(backend, watch, data_dir):
    spec, jid, watcher = job_spec(), new_job_id(), watch()
    await backend.submit_job(launch(jid, spec), spec)
    await watcher.until(jid, "succeeded")
    assert (await seen_by_model(data_dir, jid))["cwd"] == str(job_dir(data_dir, jid) / "work")


async def test_a_placeholder_a_job_has_no_value_for_is_passed_as_written(backend, watch, data_dir):
    # Validation refuses `{port}` in a job spec; one that got past it (stored before
    # that check) used to raise KeyError here, so its run request was retried, then
    # dead-lettered. Now the run starts, with the braces as written.
    spec = job_spec().model_copy(update={"env": {"JOB_PORT": "{port}", "JOB_PY": "{python}"}})
    jid, watcher = new_job_id(), watch()
    await backend.submit_job(launch(jid, spec), spec)
    await watcher.until(jid, "succeeded")
    env = (await seen_by_model(data_dir, jid))["env"]
    assert (env["JOB_PORT"], env["JOB_PY"]) == ("{port}", sys.executable)


async def test_a_job_uploads_its_outputs_through_presigned_urls(
    backend,
    watch,
    s3_server,
):
    store = ObjectStore(store_settings(s3_server))
    await store.setup()
    try:
        names = ["summary.json", "table.csv"]
        spec, jid, watcher = job_spec("--upload", outputs=names), new_job_id(), watch()
        urls = store.upload_urls(jid, names)
        await backend.submit_job(launch(jid, spec, upload_urls=urls), spec)
        done = await watcher.until(jid, "succeeded")
        assert "job_model: uploaded" in done.log_tail

        results = await store.collect(jid, names)
        async with aiohttp.ClientSession() as http:
            for result in results:
                assert result.size == len(f"{result.name} of {jid}")
                async with http.get(result.url) as resp:
                    assert resp.status == 200
                    assert await resp.text() == f"{result.name} of {jid}"
    finally:
        await store.close()


async def test_the_run_log_and_result_are_written(backend, watch, data_dir):
    spec, jid, watcher = job_spec("--exit", "5"), new_job_id(), watch()
    await backend.submit_job(launch(jid, spec), spec)
    await watcher.until(jid, "failed")
    assert watcher.states(jid) == ["running", "failed"]
    result = json.loads((job_dir(data_dir, jid) / "result.json").read_text())
    assert result["state"] == "failed" and result["exit_code"] == 5
    assert result["started_at"] <= result["finished_at"]
    assert result["log_tail"].endswith("job_model: failing with 5")


# -- limits and stops --


async def test_memory_beyond_the_limit_fails_the_run(backend, watch):
    small, big = new_job_id(), new_job_id()
    watcher = watch()
    for jid, memory in ((small, "64Mi"), (big, "1Gi")):
        spec = job_spec("--allocate", "256", resources={"memory": memory})
        await backend.submit_job(launch(jid, spec), spec)
    failed = await watcher.until(small, "failed")
    assert failed.exit_code == 1 and "MemoryError" in failed.log_tail
    assert "allocated" not in failed.log_tail
    done = await watcher.until(big, "succeeded")  # the same model, with room: it was the limit
    assert "job_model: allocated" in done.log_tail


async def test_cpu_time_beyond_cpu_times_deadline_times_out(backend, watch):
    spec = job_spec("--spin", "30", resources={"cpu": "100m"}, deadline_s=10)  # 1 CPU-second
    jid, watcher = new_job_id(), watch()
    await backend.submit_job(launch(jid, spec), spec)
    stopped = await watcher.until(jid, "timed_out")
    assert stopped.exit_code == 128 + signal.SIGXCPU
    assert "used up its CPU time (1 s)" in stopped.log_tail


async def test_the_deadline_kills_a_tree_that_ignores_sigterm(backend, watch, local_settings):
    spec = job_spec("--ignore-term", "--children", "2", "--sleep", "600", deadline_s=2.0)
    jid, watcher = new_job_id(), watch()
    submitted = time.monotonic()
    await backend.submit_job(launch(jid, spec), spec)
    await watcher.until(jid, "running")
    await wait_for(lambda: copies(jid) == 3, what="the model and its children")
    stopped = await watcher.until(jid, "timed_out")
    assert time.monotonic() - submitted >= spec.deadline_s + local_settings.stop_grace_s
    assert stopped.exit_code == 128 + signal.SIGKILL
    assert "passed its deadline of 2 s" in stopped.log_tail
    assert copies(jid) == 0


async def test_setsid_children_that_ignore_sigterm_go_at_the_deadline(backend, watch, data_dir):
    """The model ignores SIGTERM and starts processes in sessions of their own (out of
    its process group) that ignore it too: after `timed_out` none of them runs."""
    spec = job_spec("--ignore-term", "--escape", "2", "--sleep", "600", deadline_s=2.0)
    jid, watcher = new_job_id(), watch()
    await backend.submit_job(launch(jid, spec), spec)
    escaped_file = job_dir(data_dir, jid) / "work" / "escaped"
    await wait_for(lambda: escaped_file.exists() and copies(jid) == 3, what="the escapees")
    escaped = [int(pid) for pid in escaped_file.read_text().split()]
    assert all(procs.session_of(pid) == pid for pid in escaped)  # out of the model's group
    stopped = await watcher.until(jid, "timed_out")
    assert stopped.exit_code == 128 + signal.SIGKILL
    assert copies(jid) == 0
    assert [pid for pid in escaped if procs.alive(pid)] == []


async def test_setsid_children_go_when_the_model_exits(backend, watch, data_dir):
    spec = job_spec("--escape", "1")
    jid, watcher = new_job_id(), watch()
    await backend.submit_job(launch(jid, spec), spec)
    done = await watcher.until(jid, "succeeded")
    assert done.exit_code == 0
    escaped = int((job_dir(data_dir, jid) / "work" / "escaped").read_text())
    assert not procs.alive(escaped) and copies(jid) == 0


async def test_a_model_flooding_stdout_leaves_a_log_no_bigger_than_the_cap(
    backend, watch, data_dir
):
    cap = 256 * 1024
    spec = job_spec("--flood", "20", max_log_bytes=cap)  # 20 MiB of output
    jid, watcher = new_job_id(), watch()
    await backend.submit_job(launch(jid, spec), spec)
    done = await watcher.until(jid, "succeeded")
    log = job_dir(data_dir, jid) / "job.log"
    assert log.stat().st_size <= cap
    text = log.read_text()
    assert text.startswith("[spinyard] ") and "bytes of earlier output dropped" in text
    last = 20 * 1024 * 1024 // 64
    assert f"flood line {last:>12} " in done.log_tail  # the tail is the end of the run
    assert f"flood line {last - 1000:>12} " in text
    assert f"flood line {1:>12} " not in text


async def test_a_cancel_right_after_submit_cancels(backend, watch):
    spec, jid, watcher = job_spec("--sleep", "600"), new_job_id(), watch()
    await backend.submit_job(launch(jid, spec), spec)
    await backend.cancel_job(jid)
    await watcher.until(jid, "cancelled")
    assert copies(jid) == 0


async def test_a_runner_told_to_stop_as_its_model_ends_reports_cancelled(backend, watch):
    """The runner's SIGTERM came (a cancel's, to its group) but the model had already ended
    when the runner looked: it was stopped, so `cancelled`, whatever the model's exit."""
    script = "kill -TERM $PPID; exit 3"  # the model's parent is its runner
    spec = AppSpec(name="test/stopped", kind="job", command=["sh", "-c", script])
    jid, watcher = new_job_id(), watch()
    await backend.submit_job(launch(jid, spec), spec)
    ended = await watcher.until(jid, "cancelled")
    assert ended.state == "cancelled"


async def test_a_model_killed_by_a_signal_fails(backend, watch, data_dir):
    spec, jid, watcher = job_spec("--sleep", "600"), new_job_id(), watch()
    await backend.submit_job(launch(jid, spec), spec)
    await watcher.until(jid, "running")
    model = json.loads((job_dir(data_dir, jid) / "model.json").read_text())
    os.kill(model["pid"], signal.SIGKILL)
    failed = await watcher.until(jid, "failed")
    assert failed.exit_code == 128 + signal.SIGKILL
    assert "killed by SIGKILL" in failed.log_tail


async def test_a_runner_that_dies_fails_its_run_and_its_tree_goes(backend, watch):
    spec, jid, watcher = job_spec("--children", "2", "--sleep", "600"), new_job_id(), watch()
    await backend.submit_job(launch(jid, spec), spec)
    await watcher.until(jid, "running")
    await wait_for(lambda: copies(jid) == 3, what="the model and its children")

    os.kill(int((await find(backend, jid)).labels["pid"]), signal.SIGKILL)
    failed = await watcher.until(jid, "failed")
    assert failed.exit_code is None
    assert "the job runner died" in failed.log_tail
    assert copies(jid) == 0
    assert (await find(backend, jid)).labels["state"] == "failed"


async def test_a_corrupt_result_fails_the_run_and_blocks_nothing(backend, watch, data_dir):
    spec, bad, good = job_spec(), new_job_id(), new_job_id()
    for jid in (bad, good):
        await backend.submit_job(launch(jid, spec), spec)

    async def ended() -> bool:
        return not any(i.alive for i in await backend.list_instances())

    await wait_for(ended, JOB_S, what="the jobs to end")
    (job_dir(data_dir, bad) / "result.json").write_text('{"state": "bogus"}')
    watcher = watch()
    assert (await watcher.until(good, "succeeded")).exit_code == 0
    failed = await watcher.until(bad, "failed")
    assert "the job runner died" in failed.log_tail


async def test_a_missing_program_or_workdir_fails_the_run(backend, watch, tmp_path):
    watcher = watch()
    missing = job_spec().model_copy(update={"command": [str(tmp_path / "no-such-program")]})
    nowhere = job_spec(workdir=str(tmp_path / "nowhere"))
    for spec, message in ((missing, "could not run"), (nowhere, "working directory")):
        jid = new_job_id()
        await backend.submit_job(launch(jid, spec), spec)
        failed = await watcher.until(jid, "failed")
        assert failed.exit_code is None and message in failed.log_tail
        assert watcher.states(jid) == ["failed"]


async def test_resources_must_be_quantities(backend):
    spec = job_spec(resources={"memory": "lots"})
    with pytest.raises(StartFailed, match="lots"):
        await backend.submit_job(launch(new_job_id(), spec), spec)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("512Mi", 512 * 2**20),
        ("1Gi", 2**30),
        ("1.5Gi", 1.5 * 2**30),
        ("1G", 1e9),
        ("250M", 250e6),
        ("64k", 64e3),
        ("500m", 0.5),
        ("2", 2.0),
        ("2e3", 2000.0),
        (" 1Ki ", 1024.0),
    ],
)
def test_kubernetes_quantities(text, value):
    assert processes.quantity(text) == value


@pytest.mark.parametrize("text", ["", "Mi", "1MB", "1 Gi", "-1Gi", "1Gi2"])
def test_not_quantities(text):
    with pytest.raises(ValueError):
        processes.quantity(text)


# -- submitting, listing, forgetting --


async def test_concurrent_submissions_from_processes_run_once(backend, watch, data_dir, tmp_path):
    """Handler processes share a data dir; they exit, and the run lives on."""
    script = textwrap.dedent("""
        import asyncio, sys, time
        from pathlib import Path
        from dispatcher.backends.local.backend import LocalBackend
        from dispatcher.backends.settings import LocalBackendSettings
        from tests.backends.contract import job_spec, launch

        backend = LocalBackend(LocalBackendSettings(), Path(sys.argv[1]), "http://x")
        spec = job_spec("--sleep", "600")
        print("ready", flush=True)
        while not Path(sys.argv[3]).exists():  # all submit at once, to race for real
            time.sleep(0.0002)
        asyncio.run(backend.submit_job(launch(sys.argv[2], spec), spec))
    """)
    jid, go, watcher = new_job_id(), tmp_path / "go", watch()
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, str(data_dir), jid, str(go), cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        for _ in range(4)
    ]  # fmt: skip
    try:
        for proc in procs:
            assert await asyncio.wait_for(proc.stdout.readline(), JOB_S) == b"ready\n"
        go.touch()
        results = [await asyncio.wait_for(p.communicate(), JOB_S) for p in procs]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.communicate()
    assert [p.returncode for p in procs] == [0] * 4, results

    await watcher.until(jid, "running")
    assert copies(jid) == 1
    assert [i.id for i in await backend.list_instances()] == [jid]
    assert os.listdir(data_dir / "local" / "jobs") == [jid]  # the losers cleaned up


async def test_listing_follows_a_job_and_cancel_forgets_an_ended_one(backend, watch, data_dir):
    spec, jid, watcher = job_spec("--sleep", "600", deadline_s=60), new_job_id(), watch()
    stale = data_dir / "local" / "jobs" / f".{new_job_id()}.abandoned"
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))

    await backend.submit_job(launch(jid, spec), spec)
    assert (await find(backend, jid)).labels["state"] in ("starting", "running")
    assert not stale.exists()  # what a dead submitter left is cleared away
    await watcher.until(jid, "running")
    instance = await find(backend, jid)
    assert (instance.alive, instance.labels["state"]) == (True, "running")
    assert time.time() - 30 < instance.created_at <= time.time()

    await backend.cancel_job(jid)
    instance = await find(backend, jid)
    assert (instance.alive, instance.labels["state"]) == (False, "cancelled")
    await backend.cancel_job(jid)
    assert await find(backend, jid) is None
    assert not job_dir(data_dir, jid).exists()


# -- the watcher --


async def test_one_watcher_owns_the_socket_and_another_takes_over(backends, watch, data_dir):
    one, two = await backends(), await backends()
    sock = data_dir / "local" / "jobs.sock"
    first = watch(one)
    await wait_for(sock.exists, what="the first watcher to bind")
    second, third = watch(two), watch(two)

    spec, early = job_spec(), new_job_id()
    await one.submit_job(launch(early, spec), spec)
    await first.until(early, "succeeded")
    assert second.updates == third.updates == []  # they wait

    started = time.monotonic()
    await third.stop()  # a waiting watcher stops at once
    assert time.monotonic() - started < 1.0
    await first.stop()
    late = new_job_id()
    await one.submit_job(launch(late, spec), spec)
    await second.until(late, "succeeded")
    assert second.states(early) == []  # reported by the first: not again


async def test_a_stale_socket_is_replaced_and_removed_at_the_end(backend, watch, data_dir):
    sock_path = data_dir / "local" / "jobs.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dead:
        dead.bind(str(sock_path))  # as a watcher that was killed leaves it
    watcher = watch()
    spec, jid = job_spec(), new_job_id()
    await backend.submit_job(launch(jid, spec), spec)
    await watcher.until(jid, "succeeded")
    await watcher.stop()
    assert not sock_path.exists()


async def test_a_report_that_fails_is_tried_again(backend, monkeypatch):
    monkeypatch.setattr(jobwatch, "_RETRY_S", 0.01)
    tries: list[str] = []
    stopping = asyncio.Event()

    async def flaky(update) -> None:
        tries.append(update.state)
        if len(tries) <= 3:
            raise ConnectionError("NATS is away")

    spec, jid = job_spec(), new_job_id()
    await backend.submit_job(launch(jid, spec), spec)
    task = asyncio.create_task(backend.watch_jobs(flaky, stopping))
    try:
        await wait_for(lambda: "succeeded" in tries, JOB_S, what="the report to go through")
        assert tries == ["running"] * 4 + ["succeeded"]
    finally:
        stopping.set()
        await asyncio.wait_for(task, 10)


async def test_a_long_data_dir_path_still_works(local_settings, tmp_path):
    """A unix socket path must be short (108 bytes); the data dir's may not be."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    backend = LocalBackend(local_settings, deep, PUBLIC_URL)
    await backend.setup()
    watcher = JobWatch(backend)
    try:
        spec, jid = job_spec("--sleep", "600"), new_job_id()
        await backend.submit_job(launch(jid, spec), spec)
        await watcher.until(jid, "running")  # told by the runner: it is still running
        await backend.cancel_job(jid)
        await watcher.until(jid, "cancelled")
    finally:
        await watcher.stop()
        await stop_all(backend)
        await backend.cleanup()


def test_listings_read_an_ended_job_once_and_follow_a_running_one(tmp_path):
    root = tmp_path / "jobs"
    me = processes.current(os.getpid())._asdict()
    gone = me | {"start_time": me["start_time"] + 1}  # a runner that has exited

    def job(job_id: str, runner: dict, state: str | None) -> JobDir:
        path = root / job_id
        path.mkdir(parents=True)
        found = JobDir(root, job_id, path)
        found.write("runner.json", runner | {"app": "demo/x", "created_at": 1.0})
        if state:
            found.write("result.json", {"state": state, "exit_code": 0, "log_tail": ""})
        return found

    ended, running = new_job_id(), new_job_id()
    job(ended, gone, "succeeded")
    live = job(running, me, None)
    listings = Listings(root)
    first = dict(listings.all())
    assert first[ended]["labels"]["state"] == "succeeded" and not first[ended]["alive"]
    assert first[running]["labels"]["state"] == "starting" and first[running]["alive"]

    (root / ended / "result.json").unlink()  # an ended job's files are not read again
    live.write("model.json", me)
    second = dict(listings.all())
    assert second[ended]["labels"]["state"] == "succeeded"
    assert second[running]["labels"]["state"] == "running"  # a live one is

    shutil.rmtree(root / ended)  # removed (past its retention): forgotten
    assert [j for j, _ in listings.all()] == [running]


async def test_runs_run_niced_and_so_does_what_they_start(backend, watch, data_dir):
    """The runner and the model are niced, and so are their sessions where the kernel
    schedules sessions as groups (else a niced run would weigh as much as all the handlers)."""

    def nice_of(pid: int) -> int:
        return os.getpriority(os.PRIO_PROCESS, pid)

    spec, jid, watcher = job_spec("--sleep", "600"), new_job_id(), watch()
    await backend.submit_job(launch(jid, spec), spec)
    await watcher.until(jid, "running")
    here = job_dir(data_dir, jid)
    runner = json.loads((here / "runner.json").read_text())["pid"]
    model = json.loads((here / "model.json").read_text())["pid"]
    assert procs.session_of(model) == model != procs.session_of(runner) == runner
    assert [procs.niceness(p) for p in (runner, model)] == [procs.niced_as_runs()] * 2
    await backend.cancel_job(jid)
    await watcher.until(jid, "cancelled")

    off = LocalBackend(LocalBackendSettings(run_nice=0), data_dir, PUBLIC_URL)
    other = new_job_id()
    await off.submit_job(launch(other, spec), spec)
    await watcher.until(other, "running")
    pid = json.loads((job_dir(data_dir, other) / "model.json").read_text())["pid"]
    assert nice_of(pid) == os.getpriority(os.PRIO_PROCESS, 0)
    await off.cancel_job(other)
    await watcher.until(other, "cancelled")
