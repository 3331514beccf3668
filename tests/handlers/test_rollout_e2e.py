"""Revisions and rollout end to end: apps published over the gateway's HTTP API, the real
handlers, nats-server and app processes (docs/publishing.md, "What an update does").

Publish -> load -> update (changed command) -> a new load gets the new revision while the
old instance keeps serving its viewer and stops once that viewer goes idle; rollback; a
per-session viewer keeps their instance until the drain limit; a warm pool is replaced by
members of the new revision; a pinned run runs its revision.
"""

import asyncio
import contextlib
import time

import aiohttp
from structlog.testing import capture_logs

from dispatcher.gateway.app import start_gateway
from dispatcher.gateway.auth import mint
from dispatcher.gateway.security import Guard
from dispatcher.settings import AuthSettings
from handlers.deployments import slot_key
from handlers.rollout import instance_slot
from schemas import subjects
from schemas.codec import encode
from schemas.events import RunRequest, job_id_for
from tests.handlers.test_runs import running
from tests.handlers.test_viz_lifecycle import ECHO_APP, running_stack
from tests.helpers import APPS, wait_for

SECRET = "r" * 40
APP = "demo/roll"
IDLE = {"since_heartbeat_s": 2.0, "since_page_load_s": 3600, "input_window_s": 60}


def echo(tag: str, **extra) -> dict:
    """An echo app spec whose command carries `tag` (its api/info shows it)."""
    base = {"command": ["{python}", str(ECHO_APP), "--tag", tag], "start_timeout_s": 15}
    return base | extra


@contextlib.asynccontextmanager
async def publisher(settings, js, state):
    """A gateway over the stack's bus, and an HTTP session with a publisher token for `demo`."""
    guard = Guard(AuthSettings(hs256_secret=SECRET), state, "http://gw")
    runner = await start_gateway(settings.gateway, js=js, state=state, backend=None, guard=guard)
    token = mint(SECRET, [], publish=["demo"], subject="ci")
    try:
        async with aiohttp.ClientSession(
            base_url=runner.url, headers={"Authorization": f"Bearer {token}"}
        ) as http:
            yield http
    finally:
        await runner.cleanup()


async def put(http, name: str, spec: dict, status: int = 200) -> int:
    async with http.put(f"/v1/apps/{name}", json=spec) as resp:
        assert resp.status == status, await resp.text()
        return (await resp.json())["revision"]


async def tag_of(stack, instance: str) -> str:
    """The tag the instance's command carries, asked of the instance itself."""
    _app, base = await stack.backend.target(instance)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/apps/{APP}/{instance}/api/info") as resp:
            assert resp.status == 200
            return (await resp.json())["tag"]


async def ready_on(stack, subject: str, not_instance: str | None = None) -> dict:
    """The next `ready` status on `subject` of an instance other than `not_instance`."""

    def found():
        last = stack.statuses.last(subject) or {}
        return last.get("state") == "ready" and last.get("instance") != not_instance

    await wait_for(found, timeout=20, what=f"{subject} ready on a new instance")
    return stack.statuses.last(subject)


async def alive(stack, instance: str) -> bool:
    return any(i.id == instance for i in await stack.viz_instances())


async def beat_for(stack, seconds: float, *viewers: tuple[str, str]) -> None:
    """Counted heartbeats of each (session, instance) viewer, every 0.3 s for `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for session, instance in viewers:
            await stack.heartbeat(APP, session=session, instance=instance)
        await asyncio.sleep(0.3)


async def test_update_serves_new_loads_while_the_old_instance_keeps_its_viewer(settings):
    settings.handlers.spec_cache_s = 0  # the update reaches page loads at once
    async with running_stack(settings) as stack, publisher(settings, stack.js, stack.state) as http:
        subject = subjects.app_status(APP)
        assert await put(http, APP, echo("v1", idle=IDLE), status=201) == 1
        await stack.page_load(APP, session="alice")
        first = await ready_on(stack, subject)
        old = first["instance"]
        assert first["revision"] == 1 and await tag_of(stack, old) == "v1"
        assert (await stack.record(APP)).revision == 1

        # The revision is publishing's to set; it is answered beside the spec, not in it.
        async with http.put(f"/v1/apps/{APP}", json=echo("v2", revision=5)) as resp:
            assert resp.status == 422 and "revision" in await resp.text()
        assert await put(http, APP, echo("v2", idle=IDLE)) == 2
        async with http.get(f"/v1/apps/{APP}") as resp:
            body = await resp.json()
            assert body["revision"] == 2 and "revision" not in body["spec"]
        await stack.page_load(APP, session="bob")
        second = await ready_on(stack, subject, not_instance=old)
        new = second["instance"]
        assert second["revision"] == 2 and await tag_of(stack, new) == "v2"
        # The old instance moved to a draining record of its own, and still serves alice.
        drained = await stack.record(APP, instance_slot(old))
        assert drained.revision == 1 and drained.draining_since is not None
        assert (await stack.record(APP)).instance == new
        await beat_for(stack, 4.0, ("alice", old), ("bob", new))  # twice the idle limit
        assert await alive(stack, old) and await tag_of(stack, old) == "v1"
        assert await alive(stack, new)

        # Alice leaves: her instance stops as idle; bob's stays, and the app's status
        # subject (bob's instance's) says nothing of the old one stopping.
        with capture_logs() as logs:
            deadline = time.monotonic() + 15
            while await alive(stack, old) and time.monotonic() < deadline:
                await beat_for(stack, 0.3, ("bob", new))
        assert not await alive(stack, old)
        assert await alive(stack, new)
        stops = [e for e in logs if e["event"] == "viz_deployment_stopped"]
        assert [(e["instance"], e["reason"]) for e in stops] == [(old, "idle_heartbeat")]
        assert await stack.record(APP, instance_slot(old)) is None
        said = stack.statuses.by_subject[subject]
        assert not [
            s for s in said if s["instance"] == old and s["state"] in ("stopping", "stopped")
        ]
        assert stack.statuses.last(subject)["instance"] == new

        # Rollback: revision 1's spec is current again, as revision 3.
        async with http.post(f"/v1/apps/{APP}/rollback", json={"revision": 1}) as resp:
            assert resp.status == 200 and (await resp.json())["revision"] == 3
        await stack.page_load(APP, session="carol")
        third = await ready_on(stack, subject, not_instance=new)
        assert third["revision"] == 3 and await tag_of(stack, third["instance"]) == "v1"
        assert await alive(stack, new)  # bob's instance drains now


async def test_a_session_keeps_its_old_instance_until_the_drain_limit(settings):
    settings.handlers.spec_cache_s = 0
    spec = {"sharing": "per_session", "rollout": {"drain_s": 1.5}}
    async with running_stack(settings) as stack, publisher(settings, stack.js, stack.state) as http:
        alice, bob = subjects.app_status(APP, "alice"), subjects.app_status(APP, "bob")
        await put(http, APP, echo("v1", **spec), status=201)
        await stack.page_load(APP, session="alice")
        old = (await ready_on(stack, alice))["instance"]
        await put(http, APP, echo("v2", **spec))

        # Alice's reload keeps her instance (revision 1); bob, new, gets revision 2.
        count = len(stack.statuses.by_subject[alice])
        await stack.page_load(APP, session="alice")
        await wait_for(lambda: len(stack.statuses.by_subject[alice]) > count, what="answer")
        again = stack.statuses.last(alice)
        assert again["instance"] == old and again["revision"] == 1
        await stack.page_load(APP, session="bob")
        fresh = await ready_on(stack, bob)
        assert fresh["revision"] == 2 and await tag_of(stack, fresh["instance"]) == "v2"

        # However busy alice is, the drain limit stops her old instance, and she is told.
        deadline = time.monotonic() + 15
        while (stack.statuses.last(alice) or {}).get("state") != "stopped":
            assert time.monotonic() < deadline, stack.statuses.states(alice)
            await beat_for(stack, 0.3, ("alice", old))
        assert stack.statuses.last(alice)["reason"] == "drained"
        assert await alive(stack, fresh["instance"])
        # Her next load gets the current revision.
        await stack.page_load(APP, session="alice")
        now = await ready_on(stack, alice, not_instance=old)
        assert now["revision"] == 2


async def test_a_warm_pool_is_replaced_by_members_of_the_new_revision(settings):
    settings.handlers.spec_cache_s = 0
    async with running_stack(settings) as stack, publisher(settings, stack.js, stack.state) as http:
        await put(http, APP, echo("v1", pool={"size": 2}), status=201)

        async def warm(revision):
            index = await stack.state.pools.get(APP)
            members = index.warm if index else []
            return len(members) == 2 and all(m.revision == revision for m in members)

        await wait_for(lambda: warm(1), timeout=20, what="two warm members of revision 1")
        first = {m.instance for m in (await stack.state.pools.get(APP)).warm}
        await put(http, APP, echo("v2", pool={"size": 2}))
        reserved: dict[str, float] = {}

        async def replaced():
            index = await stack.state.pools.get(APP)
            reserved.update(index.starting)
            return await warm(2)

        await wait_for(replaced, timeout=30, interval=0.01, what="two warm members of revision 2")
        # Replaced one reservation at a time (each its own refill), not all at once.
        assert len(reserved) >= 2 and len(set(reserved.values())) == len(reserved)
        await wait_for(
            lambda: _none_of(stack, first), timeout=10, what="the old members to be stopped"
        )
        await stack.page_load(APP)
        ready = await ready_on(stack, subjects.app_status(APP))
        assert ready["phases"]["warm"] is True and ready["revision"] == 2
        assert await tag_of(stack, ready["instance"]) == "v2"


async def _none_of(stack, instances: set[str]) -> bool:
    return not {i.id for i in await stack.viz_instances()} & instances


def model(code: int) -> dict:
    return {"kind": "job", "command": ["{python}", str(APPS / "job_model.py"), "--exit", str(code)]}


async def test_a_pinned_run_runs_its_revision(settings, s3_server):
    name = "demo/pinned"
    async with (
        running(settings, s3_server) as runs,
        publisher(settings, runs.js, runs.state) as http,
    ):
        await put(http, name, model(3), status=201)
        await put(http, name, model(4))
        page = {"Authorization": f"Bearer {mint(SECRET, [name])}"}  # a page's token runs

        async def run(**fields) -> str:
            event = {"type": "run_request", "app": name, "session": "s-1"} | fields
            async with http.post("/v1/events", json=event, headers=page) as resp:
                assert resp.status == 202, await resp.text()
                return (await resp.json())["job_id"]

        pinned, current = await run(revision=1), await run()
        for job_id, revision, code in ((pinned, 1, 3), (current, 2, 4)):
            done = await runs.wait_state(job_id, "failed")
            assert (done["revision"], done["exit_code"]) == (revision, code)
            assert all(s["revision"] == revision for s in runs.seen[job_id])
            assert (await runs.state.jobs.get(job_id)).revision == revision

        # A revision not kept: the gateway refuses it, and so does the handler (straight on NATS).
        event = {"type": "run_request", "app": name, "session": "s-1", "revision": 9}
        async with http.post("/v1/events", json=event, headers=page) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "unknown_revision"
        request = RunRequest(app=name, session="s-1", revision=9)
        await runs.js.publish(subjects.event(subjects.RUN_REQUEST, name), encode(request))
        job_id = job_id_for(name, "s-1", None, request.id)
        failed = await runs.wait_state(job_id, "failed")
        assert failed["error"]["code"] == "unknown_revision"
        assert "revision 9" in failed["error"]["message"]


async def test_a_pinned_runs_results_are_typed_by_its_revision(settings, s3_server):
    name = "demo/typed"

    def typed(media_type: str) -> dict:
        command = ["{python}", str(APPS / "job_model.py"), "--upload"]
        return {"kind": "job", "command": command, "outputs": ["r.dat"]} | {
            "output_types": {"r.dat": media_type}
        }

    async with (
        running(settings, s3_server) as runs,
        publisher(settings, runs.js, runs.state) as http,
    ):
        await put(http, name, typed("text/plain"), status=201)
        await put(http, name, typed("application/json"))
        for revision, media_type in ((1, "text/plain"), (None, "application/json")):
            request = RunRequest(app=name, session="s-1", revision=revision)
            await runs.js.publish(subjects.event(subjects.RUN_REQUEST, name), encode(request))
            done = await runs.wait_state(job_id_for(name, "s-1", None, request.id), "succeeded")
            assert [r["type"] for r in done["results"]] == [media_type]
            assert done["revision"] == (revision or 2)


async def test_concurrent_loads_after_an_update_start_one_instance_of_the_new_revision(settings):
    settings.handlers.spec_cache_s = 0
    async with running_stack(settings) as stack, publisher(settings, stack.js, stack.state) as http:
        subject = subjects.app_status(APP)
        await put(http, APP, echo("v1"), status=201)
        await stack.page_load(APP, session="first")
        old = (await ready_on(stack, subject))["instance"]
        await put(http, APP, echo("v2"))
        await asyncio.gather(*(stack.page_load(APP, session=f"s-{i}") for i in range(12)))
        new = (await ready_on(stack, subject, not_instance=old))["instance"]
        await wait_for(lambda: stack.handled("page_load", "ok") == 13, what="every load handled")
        assert {i.id for i in await stack.viz_instances()} == {old, new}
        records = {e.key: e.value for e in await stack.state.deployments.scan()}
        assert set(records) == {slot_key(APP, "shared"), slot_key(APP, instance_slot(old))}
        assert records[slot_key(APP, "shared")].revision == 2
