"""The client against `spinyard up`: per-session loads; the gateway's refusals as `ApiError`
(bad token, page token publishing, unknown app, bad spec), a failed start as `LoadFailed`, a
failed, cancelled or unfinished run as `RunFailed` / `WaitTimeout`, no gateway as
`Unreachable`; status streams that follow a run across cut and silent connections, missing
nothing and repeating nothing; and the blocking `Client`."""

import asyncio
import contextlib

import aiohttp
import pytest

from schemas.status import AppState, JobState
from spinyard import (
    ApiError,
    AsyncClient,
    Client,
    LoadFailed,
    RunFailed,
    SpecError,
    Unreachable,
    WaitTimeout,
)
from tests.helpers import free_port, wait_for

SLOW = {
    "name": "alice/slow",
    "kind": "job",
    "command": ["{python}", "-c", "import time; time.sleep(30)"],
    "deadline_s": 60,
}
STUCK = {  # a viz app that never answers its readiness probe
    "name": "alice/stuck",
    "command": ["{python}", "-c", "import time; time.sleep(60)"],
    "start_timeout_s": 30,
}
SUMS = {
    "name": "alice/sums",
    "kind": "job",
    "command": ["{python}", "-c", "import sys, json; sys.exit(json.load(sys.stdin)['code'])"],
}


async def test_each_session_loads_its_own_instance_of_a_per_session_app(stack):
    async with (
        AsyncClient(stack["url"], stack["token"]) as one,
        AsyncClient(stack["url"], stack["token"], session="py-other") as other,
    ):
        first = await one.load("demo/classroom", timeout_s=60)
        second = await other.load("demo/classroom", timeout_s=60)
        assert first.session == one.session and second.session == "py-other"
        assert first.instance != second.instance and first.url != second.url
        assert (await one.app_status("demo/classroom")).instance == first.instance
        again = await one.load("demo/classroom", timeout_s=60)  # ready already: answered at once
        assert (again.instance, again.url) == (first.instance, first.url)
        async with aiohttp.ClientSession() as http, http.get(first.url) as page:
            assert page.status == 200  # the URL is absolute, through the gateway's proxy
        await one.heartbeat("demo/classroom")
        with pytest.raises(ApiError) as caught:
            await one.app_status("demo/classroom", "bad session!")
        assert (caught.value.status, caught.value.code) == (400, "bad_request")


async def test_a_bad_token_is_an_api_error_401(stack):
    async with AsyncClient(stack["url"], "not-a-jwt") as client:
        with pytest.raises(ApiError) as caught:
            await client.run("demo/epidemic", {})
        assert (caught.value.status, caught.value.code) == (401, "unauthorized")
        assert caught.value.message == "the token is not a JWT"
        with pytest.raises(ApiError) as caught:
            await client.publish(SUMS)
        assert caught.value.status == 401
    async with AsyncClient(stack["url"]) as client:  # no token at all
        with pytest.raises(ApiError, match="a bearer token is required") as caught:
            await client.load("demo/hello")
        assert caught.value.status == 401


async def test_a_page_token_cannot_publish_and_a_bad_spec_names_its_field(stack):
    async with AsyncClient(stack["url"], stack["page_token"]) as client:
        with pytest.raises(ApiError) as caught:
            await client.publish(SUMS)
        assert (caught.value.status, caught.value.code) == (403, "forbidden")
        assert "may not publish" in caught.value.message
    async with AsyncClient(stack["url"], stack["token"]) as client:
        with pytest.raises(ApiError) as caught:
            await client.publish(SUMS | {"deadline_s": -1})
        assert (caught.value.status, caught.value.code) == (422, "invalid_spec")
        assert caught.value.message.startswith("deadline_s:")
        with pytest.raises(ApiError) as caught:
            await client.publish(SUMS | {"name": "bob/sums"})  # another owner's
        assert caught.value.status == 403
        with pytest.raises(SpecError):
            await client.publish("no/such/spec.yaml")
        with pytest.raises(SpecError, match="needs a `name`"):
            await client.publish({"command": ["x"]})


async def test_unknown_apps_and_runs(stack):
    async with AsyncClient(stack["url"], stack["token"]) as client:
        with pytest.raises(ApiError) as caught:
            await client.load("nobody/here")
        assert (caught.value.status, caught.value.code) == (404, "unknown_app")
        with pytest.raises(ApiError) as caught:
            await client.run("nobody/here", {})
        assert caught.value.code == "unknown_app"
        with pytest.raises(ApiError) as caught:
            await client.run("demo/hello", {})  # a viz app
        assert (caught.value.status, caught.value.code) == (422, "wrong_kind")
        with pytest.raises(ApiError) as caught:
            await client.app("alice/never")
        assert caught.value.code == "unknown_app"
        with pytest.raises(ApiError) as caught:
            await client.result("j-0123456789abcdef", timeout_s=10)
        assert (caught.value.status, caught.value.code) == (404, "not_found")
        assert await client.app_status("demo/epidemic") is None  # a job app has no app status


async def test_a_failed_start_is_load_failed_with_the_log_tail(stack):
    crash = {
        "name": "alice/crash",
        "command": ["{python}", "-c", "print('no config here'); raise SystemExit(3)"],
    }
    async with AsyncClient(stack["url"], stack["token"]) as client:
        await client.publish(crash)
        with pytest.raises(LoadFailed) as caught:
            await client.load("alice/crash", timeout_s=60)
        failed = caught.value
        assert failed.code == "start_failed" and failed.status.state is AppState.FAILED
        assert "exited with code 3" in failed.message
        assert "no config here" in (failed.status.log_tail or "")
        # Loaded again, the earlier `failed` is not taken for this load's answer: it fails anew.
        with pytest.raises(LoadFailed) as again:
            await client.load("alice/crash", timeout_s=60)
        assert again.value.status.time > failed.status.time
        await client.remove("alice/crash")


async def test_a_failing_run_is_run_failed_and_check_false_returns_it(stack):
    async with AsyncClient(stack["url"], stack["token"]) as client:
        await client.publish(SUMS)
        job_id = await client.run("alice/sums", {"code": 4})
        with pytest.raises(RunFailed) as caught:
            await client.result(job_id, timeout_s=60)
        assert caught.value.code == "job_failed" and caught.value.status.exit_code == 4
        final = await client.result(job_id, timeout_s=10, check=False)
        assert final.state is JobState.FAILED and final.job_id == job_id
        assert (await client.job(job_id)).state is JobState.FAILED
        ok = await client.result(await client.run("alice/sums", {"code": 0}), timeout_s=60)
        assert ok.state is JobState.SUCCEEDED and ok.results == []


async def test_the_same_idempotency_key_is_the_same_run(stack):
    async with AsyncClient(stack["url"], stack["token"]) as client:
        await client.publish(SUMS)
        first = await client.run("alice/sums", {"code": 0}, idempotency_key="k-1")
        assert await client.run("alice/sums", {"code": 0}, idempotency_key="k-1") == first
        assert await client.run("alice/sums", {"code": 0}, idempotency_key="k-2") != first


async def test_cancel_and_timeouts(stack):
    async with AsyncClient(stack["url"], stack["token"]) as client:
        await client.publish(SLOW)
        job_id = await client.run("alice/slow")
        async with contextlib.aclosing(client.watch_job(job_id)) as statuses:
            async for status in statuses:
                if status.state is JobState.RUNNING:
                    break
        with pytest.raises(WaitTimeout) as waited:
            await client.result(job_id, timeout_s=0.5)
        assert waited.value.code == "timeout" and waited.value.last.state is JobState.RUNNING
        assert isinstance(waited.value, TimeoutError)
        await client.cancel(job_id)
        with pytest.raises(RunFailed) as caught:
            await client.result(job_id, timeout_s=30)
        assert caught.value.code == "cancelled"
        assert caught.value.status.state is JobState.CANCELLED

        await client.publish(STUCK)
        with pytest.raises(WaitTimeout) as waited:
            await client.load("alice/stuck", timeout_s=1.5)
        assert waited.value.last.state in (AppState.PENDING, AppState.STARTING)
        await client.remove("alice/stuck")


async def test_no_gateway_is_unreachable_after_the_tries():
    url = f"http://127.0.0.1:{free_port()}"
    async with AsyncClient(url, tries=2, retry_delay_s=0.05) as client:
        with pytest.raises(Unreachable, match="cannot reach the gateway"):
            await client.run("demo/epidemic", {})
        with pytest.raises(Unreachable, match="failed 2 times"):
            await client.result("j-0123456789abcdef", timeout_s=10)


async def test_a_status_stream_follows_a_run_across_cut_connections(stack, relay):
    async with (
        AsyncClient(relay.url, stack["token"]) as client,
        AsyncClient(stack["url"], stack["token"]) as direct,
    ):
        await direct.publish(SLOW)
        job_id = await direct.run("alice/slow")
        seen, later = [], None

        async def cancel_once_reconnected() -> None:
            await wait_for(lambda: relay.connections >= 2, timeout=20, what="a reconnection")
            await asyncio.sleep(0.5)  # the new stream has sent `running` again by now
            await direct.cancel(job_id)

        async with asyncio.timeout(60), contextlib.aclosing(client.watch_job(job_id)) as statuses:
            async for status in statuses:
                seen.append(status)
                if status.state is JobState.RUNNING and later is None:
                    relay.cut()  # the stream drops; the run goes on
                    later = asyncio.create_task(cancel_once_reconnected(), name="cancel-later")
                if status.state.terminal:
                    break
        await later
        assert relay.connections >= 2
        states = [s.state for s in seen]
        assert states[-1] is JobState.CANCELLED
        assert states.count(JobState.RUNNING) == 1  # the reconnected stream repeated nothing
        assert [s.time for s in seen] == sorted(s.time for s in seen)


async def test_a_silent_status_stream_is_opened_again(stack, relay):
    """`stream_idle_s` under the gateway's keep-alive period: each wait reconnects."""
    async with (
        AsyncClient(relay.url, stack["token"], stream_idle_s=0.3) as client,
        AsyncClient(stack["url"], stack["token"]) as direct,
    ):
        await direct.publish(SLOW)
        job_id = await direct.run("alice/slow")
        seen, later = [], None

        async def cancel_later() -> None:
            await asyncio.sleep(1.5)  # the stream is silent meanwhile: no status, no keep-alive
            await direct.cancel(job_id)

        async with asyncio.timeout(60), contextlib.aclosing(client.watch_job(job_id)) as statuses:
            async for status in statuses:
                seen.append(status.state)
                if status.state is JobState.RUNNING and later is None:
                    later = asyncio.create_task(cancel_later(), name="cancel-later")
                if status.state.terminal:
                    break
        await later
        assert relay.connections >= 2  # silent 0.3 s, then the gateway's `retry:` (2 s)
        assert seen.count(JobState.RUNNING) == 1 and seen[-1] is JobState.CANCELLED


def test_the_blocking_client_runs_on_its_own_loop_and_stops_it(stack):
    with Client(stack["url"], stack["token"]) as client:
        client.publish(SUMS)
        job_id = client.run("alice/sums", {"code": 0})
        states = []
        for status in client.watch_job(job_id):
            states.append(status.state)
            if status.state.terminal:
                break
        assert states[-1] is JobState.SUCCEEDED
        assert client.result(job_id).state is JobState.SUCCEEDED
        with pytest.raises(RunFailed):
            client.result(client.run("alice/sums", {"code": 1}), timeout_s=60)
        thread = client._thread
    assert not thread.is_alive() and client._loop.is_closed()


async def test_the_blocking_client_works_where_a_loop_already_runs(stack):
    with Client(stack["url"], stack["token"]) as client:  # as in a notebook's cell
        assert "demo/hello" in [app.name for app in client.apps()]


async def test_a_run_pinned_to_an_earlier_revision_runs_that_revisions_command(stack):
    exits = lambda code: ["{python}", "-c", f"import sys; sys.exit({code})"]  # noqa: E731
    app = {"name": "alice/pinned", "kind": "job", "command": exits(5)}
    async with AsyncClient(stack["url"], stack["token"]) as client:
        first = await client.publish(app)
        second = await client.publish({**app, "command": exits(0)})
        assert second.revision == first.revision + 1

        current = await client.result(await client.run("alice/pinned"), timeout_s=60)
        assert current.state is JobState.SUCCEEDED and current.revision == second.revision
        with pytest.raises(RunFailed) as caught:
            await client.result(
                await client.run("alice/pinned", revision=first.revision), timeout_s=60
            )
        assert caught.value.status.exit_code == 5
        assert caught.value.status.revision == first.revision
        with pytest.raises(ApiError) as missing:
            await client.run("alice/pinned", revision=second.revision + 50)
        assert (missing.value.status, missing.value.code) == (404, "unknown_revision")
