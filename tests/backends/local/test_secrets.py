"""Secrets on the local backend: the 0600 files, and the values in the environment of the
apps, runs and warm runners whose spec names them (and of no other), against real processes."""

import stat

import aiohttp
import pytest

from dispatcher.backends.local.backend import LocalBackend
from dispatcher.backends.local.secrets import SecretFiles
from handlers.errors import StartFailed
from schemas import errors as codes
from tests.backends.contract import (
    JOB_MODEL,
    READY_S,
    JobWatch,
    echo_spec,
    job_spec,
    launch,
    new_id,
    new_job_id,
    stop_all,
)
from tests.backends.local.procs import PUBLIC_URL
from tests.backends.local.test_jobs import job_dir, seen_by_model

VALUE = "postgres://u:pä$$ {word} w0rd@db/x"  # braces stay: a value is never filled


@pytest.fixture
async def backend(local_settings, data_dir):
    backend = LocalBackend(local_settings, data_dir, PUBLIC_URL)
    backend.takeover_s = 0.05
    await backend.setup()
    yield backend
    await stop_all(backend)
    await backend.cleanup()


@pytest.fixture
def files(data_dir) -> SecretFiles:
    return SecretFiles.under(data_dir)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_the_store_keeps_one_0600_file_per_app_and_lists_names(files, data_dir):
    assert await files.names("alice/app") == []
    assert await files.put("alice/app", "DB_URL", VALUE) is True
    assert await files.put("alice/app", "DB_URL", VALUE + "2") is False
    assert await files.put("alice/app", "A_TOKEN", "t") is True
    assert await files.put("bob/app", "DB_URL", "bob's") is True
    assert await files.names("alice/app") == ["A_TOKEN", "DB_URL"]
    path = data_dir / "local" / "secrets" / "alice" / "app.json"
    assert mode(path) == 0o600
    assert mode(path.parent) == mode(path.parent.parent) == 0o700
    assert files.read("alice/app") == {"A_TOKEN": "t", "DB_URL": VALUE + "2"}
    assert await files.remove("alice/app", "DB_URL") is True
    assert await files.remove("alice/app", "DB_URL") is False
    assert await files.names("alice/app") == ["A_TOKEN"]
    assert files.read("bob/app") == {"DB_URL": "bob's"}


async def test_a_viz_app_gets_the_secrets_its_spec_names_and_no_other(backend, files, data_dir):
    spec = echo_spec(name="alice/echo", secrets=["APP_DB_URL"])
    await files.put(spec.name, "APP_DB_URL", VALUE)
    await files.put(spec.name, "APP_UNNAMED", "not asked for")
    await files.put("bob/echo", "APP_BOBS", "another app's")
    iid = new_id()
    await backend.start_viz(iid, spec)
    await backend.wait_ready(iid, spec, READY_S)
    _, base = await backend.target(iid)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/apps/{spec.name}/{iid}/api/info") as resp:
            env = (await resp.json())["env"]
    assert env["APP_DB_URL"] == VALUE
    assert "APP_UNNAMED" not in env and "APP_BOBS" not in env
    # Nowhere in what the backend itself wrote: state files, logs.
    for path in (data_dir / "local").rglob("*"):
        if path.is_file() and "secrets" not in path.parts:
            assert VALUE.encode() not in path.read_bytes(), path


async def test_a_secret_that_is_not_set_fails_the_start_by_name_before_a_process(backend, files):
    await files.put("alice/echo", "APP_OTHER", VALUE)
    spec = echo_spec(name="alice/echo", secrets=["APP_OTHER", "APP_MISSING"])
    with pytest.raises(StartFailed) as failed:
        await backend.start_viz(new_id(), spec)
    assert failed.value.code == codes.MISSING_SECRET == "missing_secret"
    assert "APP_MISSING" in failed.value.message and VALUE not in failed.value.message
    assert await backend.list_instances() == []
    jspec = job_spec(name="alice/model", secrets=["JOB_MISSING"])
    with pytest.raises(StartFailed) as failed:
        await backend.submit_job(launch(new_job_id(), jspec), jspec)
    assert failed.value.code == codes.MISSING_SECRET and "JOB_MISSING" in failed.value.message
    with pytest.raises(StartFailed):
        await backend.start_warm(new_id(), jspec, READY_S)
    assert await backend.list_instances() == []


async def test_a_run_and_a_warm_run_get_the_secret_in_their_environment(backend, files, data_dir):
    spec = job_spec(name="alice/model", workdir=str(JOB_MODEL.parent), secrets=["JOB_TOKEN"])
    spec = spec.model_copy(update={"command": ["{python}", JOB_MODEL.name]})
    await files.put(spec.name, "JOB_TOKEN", VALUE)
    watch = JobWatch(backend)
    try:
        cold = new_job_id()
        await backend.submit_job(launch(cold, spec), spec)
        assert (await seen_by_model(data_dir, cold))["env"]["JOB_TOKEN"] == VALUE
        assert mode(job_dir(data_dir, cold) / "job.json") == 0o600  # it holds the value

        warm, hot = new_id(), new_job_id()
        await backend.start_warm(warm, spec, READY_S)
        assert await backend.claim(warm)
        assert await backend.submit_warm(launch(hot, spec), spec, warm)
        assert (await seen_by_model(data_dir, hot))["env"]["JOB_TOKEN"] == VALUE
        await watch.until(cold, "succeeded")
        await watch.until(hot, "succeeded")
    finally:
        await watch.stop()
