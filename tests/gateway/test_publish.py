"""Publishing apps over HTTP: create, update, unchanged, read, history, rollback, remove; bad
specs and wrong tokens change nothing. A real nats-server holds the apps and revisions."""

import asyncio
import json

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from dispatcher.gateway.auth import mint
from dispatcher.gateway.publish import converge
from handlers import revisions
from handlers.revisions import History
from schemas.spec import AppSpec
from tests.gateway.support import PUBLISH_SECRET as SECRET

APP = "alice/model"
URL = f"/v1/apps/{APP}"
SPEC = {"kind": "job", "command": ["python", "run.py"], "description": "v1"}


def publisher(*owners: str, ttl_s: float = 300, subject: str = "ci") -> dict:
    token = mint(SECRET, [], publish=list(owners), subject=subject, ttl_s=ttl_s)
    return {"Authorization": f"Bearer {token}"}


async def call(env, method: str, path: str, headers: dict | None = None, **kwargs):
    async with env.http.request(method, env.url + path, headers=headers, **kwargs) as resp:
        body = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, body


async def current_revision(env) -> int:
    history = await env.state.revisions.get(APP)
    return history.current if history else 0


async def test_publish_update_unchanged_history_rollback_and_remove(gw):
    auth = publisher("alice")
    status, body = await call(gw, "PUT", URL, auth, json=SPEC)
    assert status == 201, body
    assert body["app"] == body["name"] == APP and body["revision"] == 1 and body["changed"]
    first_digest = body["digest"]
    assert first_digest == revisions.digest({**SPEC, "name": APP})
    assert (await gw.state.apps.get(APP)).command == ["python", "run.py"]

    changed = {**SPEC, "description": "v2", "name": APP}
    status, body = await call(gw, "PUT", URL, auth, json=changed)
    assert (status, body["revision"]) == (200, 2) and body["digest"] != first_digest
    assert (await gw.state.apps.get(APP)).description == "v2"

    # The same spec again (keys in another order): same digest, nothing written.
    kv_rev = (await gw.state.apps.read(APP)).revision
    status, body = await call(
        gw, "PUT", URL, auth, data=json.dumps(dict(reversed(changed.items())))
    )
    assert (status, body["revision"], body["changed"]) == (200, 2, False)
    assert (await gw.state.apps.read(APP)).revision == kv_rev

    status, body = await call(gw, "GET", URL, auth)
    assert status == 200 and body["revision"] == 2 and body["spec"]["description"] == "v2"
    status, body = await call(gw, "GET", URL + "/revisions", auth)
    assert status == 200 and body["current"] == 2
    assert [r["revision"] for r in body["revisions"]] == [1, 2]
    assert {r["published_by"] for r in body["revisions"]} == {"ci"}
    assert body["revisions"][0]["digest"] == first_digest
    assert all(r["published_at"] > 0 for r in body["revisions"])

    status, body = await call(gw, "POST", URL + "/rollback", auth, json={"revision": 1})
    assert (status, body["revision"], body["digest"]) == (200, 3, first_digest)
    assert (await gw.state.apps.get(APP)).description == "v1"
    status, body = await call(gw, "POST", URL + "/rollback", auth, json={"revision": 9})
    assert status == 404 and body["error"]["code"] == "not_found"
    assert await current_revision(gw) == 3

    status, _ = await call(gw, "DELETE", URL, auth)
    assert status == 204
    assert await gw.state.apps.get(APP) is None
    status, listed = await call(gw, "GET", "/v1/apps")
    assert APP not in {a["name"] for a in listed}
    status, body = await call(gw, "GET", URL, auth)
    assert status == 404 and body["error"]["code"] == "unknown_app"
    status, body = await call(gw, "DELETE", URL, auth)
    assert status == 404

    # Published again: the numbers go on from the history, never reused.
    status, body = await call(gw, "PUT", URL, auth, json=SPEC)
    assert (status, body["revision"], body["digest"]) == (201, 4, first_digest)


async def test_a_yaml_body_with_a_framework_preset_is_stored_raw_and_run_expanded(gw):
    text = "kind: viz\nframework: panel\nscript: app.py\ndescription: from yaml\n"
    headers = {**publisher("alice"), "Content-Type": "application/yaml"}
    status, body = await call(gw, "PUT", URL, headers, data=text)
    assert status == 201, body
    assert body["digest"] == revisions.digest({**yaml.safe_load(text), "name": APP})
    current = await gw.state.apps.get(APP)
    assert current.description == "from yaml" and "panel" in " ".join(current.command)
    history = await gw.state.revisions.get(APP)
    assert "command" not in history.revisions[0].spec  # the raw spec, as submitted


WINDOW = {"days": ["mon"], "from": "09:50", "to": "11:00", "tz": "Europe/Berlin", "pool": 4}


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({**SPEC, "name": "bob/model"}, "name"),
        ({**SPEC, "kind": "notebook"}, "kind"),
        ({**SPEC, "command": []}, "command"),
        ({**SPEC, "readiness_path": "health"}, "readiness_path"),
        ({**SPEC, "colour": "red"}, "colour"),
        ({**SPEC, "schedule": [{**WINDOW, "tz": "Mars/Base"}]}, "schedule.0.tz"),
        ({**SPEC, "schedule": [WINDOW, {**WINDOW, "pool": -1}]}, "schedule.1.pool"),
    ],
)
async def test_a_bad_spec_is_422_naming_the_field_and_writes_nothing(gw, spec, field):
    auth = publisher("alice")
    assert (await call(gw, "PUT", URL, auth, json=SPEC))[0] == 201
    status, body = await call(gw, "PUT", URL, auth, json=spec)
    assert status == 422 and body["error"]["code"] == "invalid_spec"
    assert body["error"]["message"].startswith(field), body
    assert await current_revision(gw) == 1
    assert (await gw.state.apps.get(APP)).description == "v1"


async def test_a_body_that_is_not_json_is_400(gw):
    status, body = await call(gw, "PUT", URL, publisher("alice"), data=b"{nope")
    assert status == 400 and body["error"]["code"] == "bad_encoding"
    assert await gw.state.apps.get(APP) is None


def page_token(**claims) -> dict:
    return {"Authorization": "Bearer " + mint(SECRET, ["*"], subject="page", **claims)}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ("none", 401),
        ("garbage", 401),
        ("expired", 401),
        ("page", 403),  # a page's token: apps, no publish claim
        ("bob", 403),  # a publisher, of another owner
    ],
)
async def test_without_a_publisher_token_for_the_owner_nothing_is_published(gw, headers, status):
    headers = {
        "none": None,
        "garbage": {"Authorization": "Bearer not.a.jwt"},
        "expired": publisher("alice", ttl_s=-120),
        "page": page_token(),
        "bob": publisher("bob"),
    }[headers]
    assert (await call(gw, "PUT", URL, publisher("alice"), json=SPEC))[0] == 201
    for method, path, kwargs in (
        ("PUT", URL, {"json": {**SPEC, "description": "evil"}}),
        ("GET", URL, {}),
        ("GET", URL + "/revisions", {}),
        ("POST", URL + "/rollback", {"json": {"revision": 1}}),
        ("DELETE", URL, {}),
    ):
        got, body = await call(gw, method, path, headers, **kwargs)
        assert got == status and body["error"]["code"] in ("unauthorized", "forbidden"), (
            method,
            path,
            body,
        )
    assert (await gw.state.apps.get(APP)).description == "v1"
    assert await current_revision(gw) == 1


async def test_a_star_publisher_may_publish_any_owner(gw):
    status, body = await call(gw, "PUT", "/v1/apps/zed/thing", publisher("*"), json=SPEC)
    assert (status, body["app"]) == (201, "zed/thing")


async def test_with_auth_off_publishing_is_open_as_events_are(env):
    status, body = await call(env, "PUT", URL, None, json=SPEC)
    assert (status, body["revision"]) == (201, 1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.dictionaries(
            st.sampled_from(["description", "kind", "timeout_s"]),
            st.one_of(st.text(max_size=5), st.integers(-3, 3)),
            max_size=3,
        ),
        max_size=12,
    )
)
def test_revision_numbers_only_grow_and_unchanged_specs_add_none(specs):
    """Whatever is published in whatever order, numbers grow by one per change, and the
    current revision always holds the spec last published."""
    history, last = History(), None
    for spec in specs:
        new = revisions.publish(history, spec, by=None, at=0.0, keep=5)
        if spec == last:
            assert new is None
            continue
        assert new is not None and new.last == history.last + 1
        assert new.current_revision().spec == spec and len(new.revisions) <= 5
        history, last = new, spec


async def test_each_change_is_logged_with_who_but_never_the_spec(gw):
    spec = {**SPEC, "env": {"DB_PASSWORD": "hunter2-secret"}}
    with capture_logs() as logged:
        assert (await call(gw, "PUT", URL, publisher("alice"), json=spec))[0] == 201
        assert (await call(gw, "DELETE", URL, publisher("alice")))[0] == 204
    events = [(e["event"], e.get("app"), e.get("by")) for e in logged]
    assert ("app_published", APP, "ci") in events and ("app_removed", APP, "ci") in events
    assert "hunter2" not in repr(logged)


async def test_concurrent_publishes_each_get_a_revision_and_the_current_spec_is_historys(gw):
    auth = publisher("alice")
    specs = [{**SPEC, "description": f"v{i}"} for i in range(12)]
    answers = await asyncio.gather(*(call(gw, "PUT", URL, auth, json=s) for s in specs))
    assert sorted(body["revision"] for _, body in answers) == list(range(1, 13))
    history = await gw.state.revisions.get(APP)
    current = history.current_revision()
    assert current.revision == 12
    assert (await gw.state.apps.get(APP)).description == current.spec["description"]


async def test_a_publisher_that_writes_last_with_an_older_revision_is_corrected(gw):
    """The race `converge` closes: revision 1's writer reaches the apps bucket after
    revision 2's; the apps bucket must end with revision 2's spec (or none, if removed)."""
    auth = publisher("alice")
    assert (await call(gw, "PUT", URL, auth, json=SPEC))[0] == 201
    assert (await call(gw, "PUT", URL, auth, json={**SPEC, "description": "v2"}))[0] == 200
    stale = AppSpec.model_validate({**SPEC, "name": APP})
    await converge(gw.state, gw.state.revisions, APP, stale, 1)
    assert (await gw.state.apps.get(APP)).description == "v2"

    await gw.state.revisions.change(APP, revisions.removed)  # a delete, mid-flight
    await converge(gw.state, gw.state.revisions, APP, stale, 2)
    assert await gw.state.apps.get(APP) is None


async def test_the_app_list_shows_a_schedule_and_the_pool_size_it_asks_for_now(gw):
    halves = [  # together always open, whatever the test's clock says
        {"from": "00:00", "to": "12:00", "tz": "UTC", "pool": 3},
        {"from": "12:00", "to": "00:00", "tz": "UTC", "pool": 3},
    ]
    viz = {"kind": "viz", "command": ["python", "app.py"], "pool": {"size": 1}}
    status, _ = await call(gw, "PUT", URL, publisher("alice"), json={**viz, "schedule": halves})
    assert status == 201
    status, _ = await call(gw, "PUT", "/v1/apps/alice/plain", publisher("alice"), json=viz)
    assert status == 201

    status, listed = await call(gw, "GET", "/v1/apps")
    pools = {a["name"]: a["pool"] for a in listed}
    assert pools["alice/plain"] == {"size": 1}
    assert pools[APP]["size"] == 1 and pools[APP]["now"] == 3
    assert [w["from"] for w in pools[APP]["schedule"]] == ["00:00", "12:00"]
