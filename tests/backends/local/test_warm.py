"""Warm runners on the local backend: what only it does, against real processes.

The shared warm-runner contract runs in test_backend.py; these check the
fork of a Python model with its preloads, the exec of any other command,
the hand-over's hygiene, the log cap, and runners that die or fail to start.
"""

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from dispatcher.backends.local.backend import LocalBackend
from dispatcher.backends.local.warmrunner import SOCKET
from handlers.errors import StartFailed
from schemas import errors as codes
from tests.backends.contract import (
    JOB_MODEL,
    READY_S,
    JobWatch,
    find,
    job_spec,
    launch,
    new_id,
    new_job_id,
    stop_all,
)
from tests.backends.local import procs
from tests.backends.local.procs import PUBLIC_URL
from tests.backends.local.test_jobs import job_dir, seen_by_model
from tests.helpers import wait_for


@pytest.fixture
async def backend(local_settings, data_dir):
    backend = LocalBackend(local_settings, data_dir, PUBLIC_URL)
    backend.takeover_s = 0.05
    await backend.setup()
    yield backend
    await stop_all(backend)
    assert await backend.list_instances() == []
    await backend.cleanup()


@pytest.fixture
async def watcher(backend):
    watch = JobWatch(backend)
    yield watch
    await watch.stop()


def model_spec(*args: str, **fields):
    """The job model run as `{python} job_model.py ...` from its directory, with a pool."""
    spec = job_spec(*args, workdir=str(JOB_MODEL.parent), pool={"size": 1}, **fields)
    return spec.model_copy(update={"command": ["{python}", JOB_MODEL.name, *args]})


async def warm_run(backend, spec, jid: str, inputs: dict | None = None) -> str:
    """Start a warm runner, claim it and hand it the job, which it starts; the runner's id."""
    warm = new_id()
    await backend.start_warm(warm, spec, READY_S)
    assert await backend.claim(warm)
    assert await backend.submit_warm(launch(jid, spec, inputs), spec, warm) == "running"
    return warm


async def test_a_python_model_is_forked_with_its_preloads_and_gets_what_a_cold_run_gets(
    backend, watcher, data_dir, monkeypatch
):
    monkeypatch.setenv("SPINYARD_NATS__PASSWORD", "must-not-leak")
    spec = model_spec(
        "--write",
        preload=["xml.dom.minidom", "colorsys"],
        env={"JOB_SEE_MODULES": "xml.dom.minidom,colorsys,wave", "JOB_WHERE": "{python}"},
        deadline_s=30,
    )
    jid, inputs = new_job_id(), {"n": 7, "text": "é ✓"}
    warm = await warm_run(backend, spec, jid, inputs)
    assert (await watcher.until(jid, "succeeded")).exit_code == 0

    seen = await seen_by_model(data_dir, jid)
    here = job_dir(data_dir, jid)
    assert seen["preloaded"] == ["xml.dom.minidom", "colorsys"]  # imported before it ran
    assert "dispatcher.backends.local.warmrunner" in seen["cmdline"]  # forked, not exec'd
    assert seen["argv"] == ["--write"]
    assert seen["stdin"] == seen["inputs"] == inputs
    assert seen["cwd"] == str(JOB_MODEL.parent)
    assert seen["env"] == {
        "SPINYARD_JOB_ID": jid,
        "SPINYARD_APP": spec.name,
        "SPINYARD_INPUTS": str(here / "inputs.json"),
        "SPINYARD_UPLOADS": str(here / "uploads.json"),
        "SPINYARD_OUTPUT_DIR": str(here / "work"),
        "SPINYARD_DEADLINE_S": "30",
        "JOB_SEE_MODULES": "xml.dom.minidom,colorsys,wave",
        "JOB_WHERE": sys.executable,
    }
    assert (here / "work" / "scratch.txt").read_text() == "hello"
    model = json.loads((here / "model.json").read_text())
    runner = json.loads((here / "runner.json").read_text())
    assert runner["pid"] != model["pid"]
    assert "must-not-leak" not in (here / "job.log").read_text()
    assert not (data_dir / "local" / "warm" / warm).exists()  # used up, its files gone


async def test_the_hand_over_answers_once_the_models_process_is_there(backend, watcher, data_dir):
    spec = model_spec("--sleep", "600")
    jid = new_job_id()
    await warm_run(backend, spec, jid, {"n": 1})
    here = job_dir(data_dir, jid)
    assert json.loads((here / "job.json").read_text())["job_dir"] == str(here)  # claimed
    runner = json.loads((here / "runner.json").read_text())["pid"]
    # The answer comes as soon as the model is forked: its record follows.
    record = here / "model.json"
    await wait_for(record.exists, timeout=5, what="the model's record")
    model = json.loads(record.read_text())["pid"]
    assert procs.parent_of(model) == runner  # forked by the runner
    assert procs.alive(model)
    await seen_by_model(data_dir, jid)  # the model runs: the fork's set-up is done
    # niced (run_nice's default), and so are their sessions where sessions are groups
    assert [procs.niceness(pid) for pid in (runner, model)] == [procs.niced_as_runs()] * 2
    fds = f"/proc/{model}/fd"
    held = [os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds)]
    assert not [s for s in held if s.startswith("socket:")]  # not the submitter's
    again = new_id()
    await backend.start_warm(again, spec, READY_S)
    assert await backend.claim(again)
    assert await backend.submit_warm(launch(jid, spec), spec, again) == "taken"  # it has one
    await backend.cancel_job(jid)
    await watcher.until(jid, "cancelled")


async def test_a_start_answered_running_is_left_to_the_caller_unless_handed_over_again(
    backend, watcher, data_dir
):
    """The caller records a start its runner answered "running" (run_start does), so the
    watcher does not report it; it still reports how the run ends. A start handed over
    again (a redelivered run_start, whose first try may not have recorded it) is reported."""
    spec = model_spec("--sleep", "600")
    quiet, again = new_job_id(), new_job_id()
    for jid in (quiet, again):
        await warm_run(backend, spec, jid)
        record = job_dir(data_dir, jid) / "model.json"
        await wait_for(record.exists, timeout=5, what="the model's record")
    other = new_id()
    await backend.start_warm(other, spec, READY_S)
    assert await backend.claim(other)
    assert await backend.submit_warm(launch(again, spec), spec, other) == "taken"
    await watcher.until(again, "running")
    for jid in (quiet, again):
        await backend.cancel_job(jid)
        await watcher.until(jid, "cancelled")
    assert watcher.states(quiet) == ["cancelled"]
    assert watcher.states(again) == ["running", "cancelled"]


async def test_a_warm_run_whose_model_cannot_start_is_taken_and_fails(backend, watcher, tmp_path):
    workdir = tmp_path / "app"
    workdir.mkdir()
    (workdir / JOB_MODEL.name).write_bytes(JOB_MODEL.read_bytes())
    spec = model_spec().model_copy(update={"workdir": str(workdir)})
    warm = new_id()
    await backend.start_warm(warm, spec, READY_S)
    (workdir / JOB_MODEL.name).unlink()
    workdir.rmdir()  # the app's working directory went away while the runner waited
    jid = new_job_id()
    assert await backend.claim(warm)
    assert await backend.submit_warm(launch(jid, spec), spec, warm) == "taken"
    failed = await watcher.until(jid, "failed")
    assert "does not exist" in failed.log_tail


async def test_a_cold_run_of_the_same_spec_is_execd_and_sees_no_preloads(
    backend, watcher, data_dir
):
    spec = model_spec(preload=["colorsys"], env={"JOB_SEE_MODULES": "colorsys"})
    jid = new_job_id()
    await backend.submit_job(launch(jid, spec), spec)
    await watcher.until(jid, "succeeded")
    seen = await seen_by_model(data_dir, jid)
    assert seen["preloaded"] == []
    assert "dispatcher.backends.local.warmrunner" not in seen["cmdline"]


async def test_a_forked_model_runs_in_its_own_session_and_its_exit_code_counts(
    backend, watcher, data_dir
):
    jid = new_job_id()
    await warm_run(backend, model_spec("--sleep", "600"), jid)
    record = job_dir(data_dir, jid) / "model.json"
    await wait_for(record.exists, timeout=5, what="the model's record")
    model = json.loads(record.read_text())
    runner = json.loads((job_dir(data_dir, jid) / "runner.json").read_text())
    assert procs.session_of(model["pid"]) == model["pid"] != runner["pid"]
    await backend.cancel_job(jid)
    await watcher.until(jid, "cancelled")

    failing = new_job_id()
    await warm_run(backend, model_spec("--exit", "3"), failing)
    failed = await watcher.until(failing, "failed")
    assert failed.exit_code == 3
    assert "job_model: failing with 3" in failed.log_tail


async def test_the_log_cap_holds_on_a_warm_run(backend, watcher, data_dir):
    cap = 256 * 1024
    jid = new_job_id()
    await warm_run(backend, model_spec("--flood", "8", max_log_bytes=cap), jid)
    done = await watcher.until(jid, "succeeded")
    log = job_dir(data_dir, jid) / "job.log"
    assert log.stat().st_size <= cap
    assert "bytes of earlier output dropped" in log.read_text()
    last = 8 * 1024 * 1024 // 64
    assert f"flood line {last:>12} " in done.log_tail


async def test_a_non_python_command_is_execd(backend, watcher, data_dir):
    script = 'echo "sh ran $SPINYARD_JOB_ID at $(cut -d" " -f19 /proc/$$/stat)"; exit 4'
    spec = job_spec(pool={"size": 1}).model_copy(update={"command": ["/bin/sh", "-c", script]})
    warm = new_id()
    await backend.start_warm(warm, spec, READY_S)
    config = json.loads((data_dir / "local" / "warm" / warm / "warm.json").read_text())
    assert config["fork"] is False
    jid = new_job_id()
    assert await backend.claim(warm)
    assert await backend.submit_warm(launch(jid, spec), spec, warm)
    failed = await watcher.until(jid, "failed")
    assert failed.exit_code == 4
    niced = min(os.getpriority(os.PRIO_PROCESS, 0) + 10, 19)  # run_nice's default
    assert f"sh ran {jid} at {niced}" in failed.log_tail.splitlines()  # niced, as runs are


async def test_a_warm_runner_killed_while_waiting_is_not_claimed(backend, watcher):
    spec = model_spec()
    warm = new_id()
    await backend.start_warm(warm, spec, READY_S)
    pid = int((await find(backend, warm)).labels["pid"])
    os.kill(pid, signal.SIGKILL)
    await wait_for(lambda: not procs.alive(pid), what="the runner to die")
    assert (await find(backend, warm)).alive is False
    assert not await backend.claim(warm)
    jid = new_job_id()
    assert not await backend.submit_warm(launch(jid, spec), spec, warm)
    assert await find(backend, warm) is None  # forgotten
    assert await find(backend, jid) is None  # and the job is left to a cold start
    await backend.submit_job(launch(jid, spec), spec)
    await watcher.until(jid, "succeeded")


async def test_a_preload_that_fails_to_import_fails_the_start_with_its_log(backend, data_dir):
    spec = model_spec(preload=["colorsys", "no_such_module_here"])
    warm = new_id()
    with pytest.raises(StartFailed) as err:
        await backend.start_warm(warm, spec, READY_S)
    assert err.value.code == codes.START_FAILED
    assert "No module named 'no_such_module_here'" in err.value.log_tail
    assert await find(backend, warm) is None
    assert not (data_dir / "local" / "warm" / warm).exists()


async def test_a_warm_runner_holds_no_credentials(backend, data_dir, monkeypatch):
    monkeypatch.setenv("SPINYARD_STORE__SECRET_KEY", "must-not-leak")
    warm = new_id()
    await backend.start_warm(warm, model_spec(env={"JOB_X": "1"}), READY_S)
    pid = int((await find(backend, warm)).labels["pid"])
    with open(f"/proc/{pid}/environ", "rb") as f:
        environ = f.read().split(b"\0")
    assert not [v for v in environ if v.startswith(b"SPINYARD_")]
    assert b"JOB_X=1" in environ
    files = data_dir / "local" / "warm" / warm
    modes = [os.stat(path).st_mode & 0o777 for path in (files, files / "sock", files / "warm.json")]
    assert modes == [0o700, 0o600, 0o600]  # its own, owner only


# -- refills forked from a waiting runner --


def born(data_dir, warm: str) -> float:
    """When the first interpreter of the runner's lineage started (its warm.json)."""
    return json.loads((data_dir / "local" / "warm" / warm / "warm.json").read_text())["born"]


async def pid_of(backend, warm: str) -> int:
    return int((await find(backend, warm)).labels["pid"])


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def children_of(pid: int) -> list[int]:
    """The live processes whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if parent_of(int(entry.name)) == pid and procs.alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:  # it ended while we looked
                continue
    return found


async def test_the_model_is_forked_ahead_and_one_killed_waiting_is_forked_anew(
    backend, watcher, data_dir
):
    """A waiting runner of a Python model has forked the run's process already: the start
    costs no fork. A spare that died while waiting is replaced by a fork at the start; a
    runner stopped while waiting takes its spare with it."""
    spec = model_spec()
    warm = new_id()
    await backend.start_warm(warm, spec, READY_S)
    [spare] = children_of(await pid_of(backend, warm))
    here = data_dir / "local" / "warm" / warm  # the spare leaves nothing in its directory
    assert sorted(os.listdir(here)) == ["sock", "warm.json", "warm.log"]
    jid = new_job_id()
    assert await backend.claim(warm)
    assert await backend.submit_warm(launch(jid, spec), spec, warm) == "running"
    assert (await watcher.until(jid, "succeeded")).exit_code == 0
    assert json.loads((job_dir(data_dir, jid) / "model.json").read_text())["pid"] == spare

    killed = new_id()
    await backend.start_warm(killed, spec, READY_S)
    [spare] = children_of(await pid_of(backend, killed))
    os.kill(spare, signal.SIGKILL)
    await wait_for(lambda: not procs.alive(spare), what="the spare to die")
    jid = new_job_id()
    assert await backend.claim(killed)
    assert await backend.submit_warm(launch(jid, spec), spec, killed) == "running"
    assert (await watcher.until(jid, "succeeded")).exit_code == 0
    assert json.loads((job_dir(data_dir, jid) / "model.json").read_text())["pid"] != spare

    stopped = new_id()
    await backend.start_warm(stopped, spec, READY_S)
    [spare] = children_of(await pid_of(backend, stopped))
    await backend.stop_viz(stopped)
    await wait_for(lambda: not procs.alive(spare), timeout=5, what="the spare to end")


async def test_a_new_runner_is_forked_from_a_waiting_one_and_outlives_it(
    backend, watcher, data_dir
):
    spec = model_spec(preload=["colorsys"], env={"JOB_SEE_MODULES": "colorsys"})
    seed, sibling = new_id(), new_id()
    await backend.start_warm(seed, spec, READY_S)
    await backend.start_warm(sibling, spec, READY_S)
    assert born(data_dir, sibling) == born(data_dir, seed)  # no interpreter of its own
    pid = await pid_of(backend, sibling)
    assert procs.session_of(pid) == pid  # stoppable on its own
    seed_pid = await pid_of(backend, seed)  # waiting at our niceness: a hand-over is a start's
    assert procs.niceness(pid) == procs.niceness(seed_pid) == procs.niced_as_runs(0)
    assert parent_of(pid) not in (os.getpid(), await pid_of(backend, seed))
    assert (data_dir / "local" / "warm" / sibling / "warm.log").exists()

    await backend.stop_viz(seed)
    assert procs.alive(pid)
    jid = new_job_id()
    assert await backend.claim(sibling)
    assert await backend.submit_warm(launch(jid, spec), spec, sibling) == "running"
    assert (await watcher.until(jid, "succeeded")).exit_code == 0
    seen = await seen_by_model(data_dir, jid)
    assert seen["preloaded"] == ["colorsys"]
    assert seen["cwd"] == str(JOB_MODEL.parent)


async def test_once_the_runner_last_forked_from_is_taken_another_waiting_one_is(backend, data_dir):
    spec = model_spec()
    first, second = new_id(), new_id()
    await backend.start_warm(first, spec, READY_S)
    await backend.start_warm(second, spec, READY_S)  # forked from `first`
    lineage = born(data_dir, first)
    assert born(data_dir, second) == lineage
    assert await backend.claim(first)  # no pool member any more: not to be forked from
    third = new_id()
    await backend.start_warm(third, spec, READY_S)
    assert born(data_dir, third) == lineage  # forked, from `second`
    await backend.stop_viz(first)
    assert await backend.claim(second)
    await backend.stop_viz(second)
    fourth = new_id()
    await backend.start_warm(fourth, spec, READY_S)
    assert born(data_dir, fourth) == lineage  # from `third`
    assert parent_of(await pid_of(backend, fourth)) != os.getpid()


async def test_a_runner_is_forked_only_from_one_of_the_same_spec_and_environment(backend, data_dir):
    spec = model_spec()
    first = new_id()
    await backend.start_warm(first, spec, READY_S)
    others = [
        spec.model_copy(update={"env": {"JOB_OTHER": "1"}}),
        spec.model_copy(update={"revision": 2}),
        model_spec(preload=["colorsys"]),
        model_spec("--write"),
        spec.model_copy(update={"name": "test/other"}),
    ]
    for other in others:
        warm = new_id()
        await backend.start_warm(warm, other, READY_S)
        assert born(data_dir, warm) > born(data_dir, first), other


async def test_a_runner_past_the_age_limit_is_not_forked_from(local_settings, tmp_path):
    data_dir = tmp_path / "aged"
    settings = local_settings.model_copy(update={"warm_fork_max_age_s": 0.5})
    backend = LocalBackend(settings, data_dir, PUBLIC_URL)
    await backend.setup()
    try:
        spec = model_spec()
        first, young, old = new_id(), new_id(), new_id()
        await backend.start_warm(first, spec, READY_S)
        await backend.start_warm(young, spec, READY_S)
        assert born(data_dir, young) == born(data_dir, first)
        await asyncio.sleep(0.6)
        await backend.start_warm(old, spec, READY_S)
        assert born(data_dir, old) > born(data_dir, first) + 0.5
    finally:
        await stop_all(backend)
        await backend.cleanup()


async def test_a_seed_that_does_not_answer_leaves_a_runner_started_the_usual_way(backend, data_dir):
    spec = model_spec()
    seed, warm = new_id(), new_id()
    await backend.start_warm(seed, spec, READY_S)
    stuck = await pid_of(backend, seed)
    os.kill(stuck, signal.SIGSTOP)  # connects, but answers nothing within the backend's wait
    try:
        await backend.start_warm(warm, spec, READY_S)
    finally:
        os.kill(stuck, signal.SIGCONT)
    assert born(data_dir, warm) > born(data_dir, seed)
    pid = await pid_of(backend, warm)
    assert parent_of(pid) == os.getpid()  # spawned, as ever

    # The seed now forks the sibling it was asked for; with no word from the backend, the
    # sibling exits, and nothing but the spawned runner (and the model it forked ahead)
    # serves that directory.
    def serving() -> list[int]:
        found = procs.processes_logging_to(data_dir / "local" / "warm" / warm, fd=2)
        return [p for p in found if parent_of(p) != pid]

    await wait_for(lambda: serving() == [pid], READY_S, what="the unanswered sibling's exit")
    jid = new_job_id()
    assert await backend.claim(warm)
    assert await backend.submit_warm(launch(jid, spec), spec, warm) == "running"


NUMPY_DRAW = "import numpy\nprint('draw', numpy.random.random(), flush=True)\n"


async def test_runs_forked_from_one_lineage_draw_different_random_numbers(
    backend, watcher, tmp_path
):
    (tmp_path / "draw.py").write_text(NUMPY_DRAW)
    spec = job_spec(
        workdir=str(tmp_path),
        pool={"size": 1},
        preload=["numpy"],
        env={"OPENBLAS_NUM_THREADS": "1"},
        resources={"memory": "1Gi"},
    ).model_copy(update={"command": ["{python}", "draw.py"]})
    seed = new_id()
    await backend.start_warm(seed, spec, READY_S)
    draws = []
    for _ in range(3):
        jid = new_job_id()
        await warm_run(backend, spec, jid)  # on a runner forked from `seed`
        done = await watcher.until(jid, "succeeded")
        draws.append(next(x for x in done.log_tail.splitlines() if x.startswith("draw ")))
    assert len(set(draws)) == 3, draws


async def test_a_directory_left_by_a_runner_that_died_after_its_answer_is_swept(backend, data_dir):
    warm = new_id()
    await backend.start_warm(warm, model_spec(), READY_S)
    root = data_dir / "local" / "warm"
    left, fresh = root / new_id(), root / new_id()
    for directory in (left, fresh):
        directory.mkdir()
        (directory / "warm.log").write_text("its last words\n")
    long_ago = time.time() - 2 * 3600
    os.utime(left, (long_ago, long_ago))
    os.utime(root / warm, (long_ago, long_ago))  # waiting a long time, but an instance
    await backend.list_instances()  # the reaper's pass
    assert not left.exists()
    assert fresh.exists()  # maybe a runner being started right now
    assert (root / warm / SOCKET).exists()


async def test_a_cancel_right_after_the_answer_stops_the_model(backend, watcher, data_dir):
    spec = model_spec("--sleep", "600")
    jid = new_job_id()
    await warm_run(backend, spec, jid)
    await backend.cancel_job(jid)  # maybe before the forked model has its session
    assert (await watcher.until(jid, "cancelled")).state == "cancelled"
    await wait_for(lambda: not procs.processes_logging_to(job_dir(data_dir, jid)), timeout=5)


def _bad_runs(data_dir: Path, jid: str) -> dict[str, bytes]:
    """Messages a waiting runner must not take as a run (the socket is 0600: a defence)."""
    good = {"inputs": {}, "uploads": {}}
    jobs, elsewhere = data_dir / "local" / "jobs", data_dir / "elsewhere"

    def framed(body: object) -> bytes:
        data = json.dumps(body).encode()
        return b"run %d\n" % len(data) + data

    return {
        "a path, as runners once took": str(data_dir / "local" / "jobs").encode() + b"\n",
        "no size": b"run \n{}",
        "too large": b"run 999999999999\n",
        "short": b"run 100\n{}",
        "not JSON": b"run 3\nabc",
        "not an object": framed([1, 2]),
        "no job dir": framed(good | {"job": {}}),
        "a bad job id": framed(good | {"job": {"job_dir": str(jobs / f"x-{jid}")}}),
        "a job dir elsewhere": framed(good | {"job": {"job_dir": str(elsewhere / jid)}}),
    }


@pytest.mark.parametrize(
    "case", list(_bad_runs(Path("/d"), "j-" + "0" * 24)), ids=lambda c: c.replace(" ", "-")
)
async def test_a_runner_sent_something_other_than_a_run_starts_nothing(backend, data_dir, case):
    jid = new_job_id()
    warm = new_id()
    await backend.start_warm(warm, model_spec(), READY_S)
    pid = int((await find(backend, warm)).labels["pid"])
    reader, writer = await asyncio.open_unix_connection(data_dir / "local" / "warm" / warm / SOCKET)
    writer.write(_bad_runs(data_dir, jid)[case])
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), READY_S) == b""  # no answer: it went
    writer.close()
    await wait_for(lambda: not procs.alive(pid), timeout=5, what="the runner's exit")
    jobs = data_dir / "local" / "jobs"
    assert not list(jobs.glob(f"*{jid}*"))  # nothing written for the job
    assert not (data_dir / "elsewhere").exists()
    await backend.stop_viz(warm)
