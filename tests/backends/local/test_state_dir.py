"""`backend.local.state_dir`: the local backend's process state kept outside the data dir
(say on tmpfs), and refused where someone else could reach it."""

import os

import pytest

from dispatcher.backends.local.backend import LocalBackend
from dispatcher.backends.local.paths import StateDirError
from dispatcher.backends.settings import LocalBackendSettings
from tests.backends.contract import (
    READY_S,
    JobWatch,
    job_spec,
    launch,
    new_id,
    new_job_id,
    stop_all,
)
from tests.backends.local.procs import PUBLIC_URL
from tests.backends.local.test_warm import model_spec


def backend_in(state_dir, data_dir) -> LocalBackend:
    settings = LocalBackendSettings(stop_grace_s=1.0, state_dir=state_dir)
    backend = LocalBackend(settings, data_dir, PUBLIC_URL)
    backend.takeover_s = 0.05
    return backend


async def test_runs_and_warm_runners_keep_their_files_in_the_state_dir(tmp_path):
    state, data = tmp_path / "state", tmp_path / "data"
    backend = backend_in(state, data)
    await backend.setup()
    watcher = JobWatch(backend)
    try:
        spec = model_spec(deadline_s=30)
        cold, warm_run, warm = new_job_id(), new_job_id(), new_id()
        await backend.submit_job(launch(cold, spec), spec)
        await backend.start_warm(warm, spec, READY_S)
        assert (state / "instances" / f"{warm}.json").exists()
        assert (state / "warm" / warm / "warm.json").exists()
        assert await backend.claim(warm)
        assert await backend.submit_warm(launch(warm_run, spec), spec, warm) == "running"
        for jid in (cold, warm_run):
            assert (await watcher.until(jid, "succeeded")).exit_code == 0
            assert (state / "jobs" / jid / "result.json").exists()
        listed = {i.id for i in await backend.list_instances()}
        assert {cold, warm_run} <= listed
        assert (state / "jobs.sock").exists()
        assert not (data / "local").exists() or not any((data / "local").iterdir())
        assert os.stat(state).st_mode & 0o777 == 0o700
    finally:
        await watcher.stop()
        await stop_all(backend)
        await backend.cleanup()


@pytest.mark.parametrize("how", ["others_write", "not_ours", "symlink", "a_file"])
async def test_a_state_dir_others_could_reach_is_refused(tmp_path, how):
    state = tmp_path / "state"
    if how == "symlink":
        (tmp_path / "real").mkdir(mode=0o700)
        state.symlink_to(tmp_path / "real")
    elif how == "a_file":
        state.write_text("")
    else:
        state.mkdir(mode=0o700)
        if how == "others_write":
            state.chmod(0o777)
        else:
            os.chown(state, 65534, 65534)  # nobody's (the tests run as root)
    backend = backend_in(state, tmp_path / "data")
    with pytest.raises(StateDirError, match=str(state)):
        await backend.setup()
    with pytest.raises(StateDirError):  # nor does a start write anything there
        await backend.submit_job(launch(new_job_id(), job_spec()), job_spec())
    assert not (tmp_path / "real" / "jobs").exists()
    assert not state.is_dir() or not (state / "jobs").exists()
