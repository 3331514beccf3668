"""Rollout's pure parts: which revision is older, where a heartbeat counts, when an instance
has drained, which pool members are stale, how activity keys merge; the new fields' checks,
and records written before revisions existed still read. (End to end: test_rollout_e2e.py.)"""

import msgpack
import pytest
from pydantic import ValidationError

from dispatcher.gateway import GatewayError
from dispatcher.gateway.publish import parse_spec
from handlers import rollout
from handlers.activity import Mark
from handlers.deployments import Deployment
from handlers.jobs import Job
from handlers.pools import PoolIndex, PoolMember
from handlers.state import Entry
from schemas import codec
from schemas.events import Heartbeat, RunRequest
from schemas.spec import AppSpec, load_spec
from schemas.status import AppState

SPEC = AppSpec(name="demo/app", command=["serve"], revision=3, rollout={"drain_s": 10})


def dep(slot="shared", **fields) -> Deployment:
    base = dict(
        app="demo/app",
        slot=slot,
        instance="i-0123456789abcdef",
        state=AppState.READY,
        event_id="ev-1",
        created_at=100.0,
        last_page_load=100.0,
    )
    return Deployment(**(base | fields))


@pytest.mark.parametrize(
    ("revision", "current", "older"),
    [
        (1, 2, True),
        (None, 2, True),
        (2, 2, False),
        (3, 2, False),
        (None, None, False),
        (4, None, False),
    ],
)
def test_older_only_when_the_app_has_a_revision_and_the_instance_is_behind(
    revision, current, older
):
    assert rollout.older(revision, current) is older


def test_a_heartbeat_counts_for_the_session_the_instance_it_names_or_the_shared_slot():
    per_session = SPEC.model_copy(update={"sharing": "per_session"})
    assert rollout.heartbeat_slot(per_session, "s-1", "i-0123456789abcdef") == "session.s-1"
    assert (
        rollout.heartbeat_slot(SPEC, "s-1", "i-0123456789abcdef") == "instance.i-0123456789abcdef"
    )
    assert rollout.heartbeat_slot(SPEC, "s-1", None) == "shared"


def test_an_instance_has_drained_once_drain_s_passed_since_it_began_draining():
    assert rollout.drain_reason(dep(), SPEC, now=1e9) is None  # not draining: never
    draining = dep(draining_since=200.0)
    assert rollout.drain_reason(draining, SPEC, now=209.0) is None
    assert rollout.drain_reason(draining, SPEC, now=211.0) == "drained"


def test_pool_members_of_older_revisions_are_stale():
    def member(instance, revision):
        return PoolMember(instance=instance, url="u", created_at=1, ready_at=2, revision=revision)

    index = PoolIndex(
        warm=[member("i-a", 2), member("i-b", None), member("i-c", 3), member("i-d", 4)]
    )
    assert rollout.stale_members(index, SPEC) == {"i-a", "i-b"}
    assert rollout.stale_members(index, SPEC.model_copy(update={"revision": None})) == set()


def test_a_shared_instances_activity_is_its_slots_and_its_own_keys_latest():
    def entry(key, at):
        return Entry(key, Mark(at=at), 1)

    shared = dep()
    own = f"demo.app.instance.{shared.instance}"
    marks = {
        "demo.app.shared": {"heartbeat": entry("a", 5.0), "page_load": entry("b", 9.0)},
        own: {"heartbeat": entry("c", 7.0)},
        "demo.app.instance.i-other": {"heartbeat": entry("d", 99.0)},
    }
    taken = rollout.take_marks("demo.app.shared", shared, marks)
    assert {k: e.value.at for k, e in taken.items()} == {"heartbeat": 7.0, "page_load": 9.0}
    assert list(marks) == ["demo.app.instance.i-other"]  # the rest is left to be pruned
    # A draining record's activity is its own slot's only.
    drained = dep(slot=f"instance.{shared.instance}")
    marks = {own: {"heartbeat": entry("c", 7.0)}, "demo.app.shared": {"heartbeat": entry("a", 8.0)}}
    taken = rollout.take_marks(own, drained, marks)
    assert {k: e.value.at for k, e in taken.items()} == {"heartbeat": 7.0}


def test_heartbeat_instance_and_run_revision_are_checked():
    base = {"app": "demo/app", "session": "s-1", "visible": True, "focused": True, "idle_s": 0}
    assert Heartbeat(**base).instance is None  # pages that send none still validate
    assert Heartbeat(**base, instance="i-0123456789abcdef").instance == "i-0123456789abcdef"
    for bad in ("i-x", "../i-0123456789abcdef", "i-0123456789abcdef\n", "I-0123456789ABCDEF"):
        with pytest.raises(ValidationError, match="instance"):
            Heartbeat(**base, instance=bad)
    for bad in (0, -1, "two", 1.5):
        with pytest.raises(ValidationError, match="revision"):
            RunRequest(app="demo/app", session="s-1", revision=bad)


def test_records_from_before_revisions_still_read():
    old = {
        k: v
        for k, v in dep().model_dump(mode="json").items()
        if k not in ("revision", "draining_since")
    }
    assert codec.decode(Deployment, msgpack.packb(old)).revision is None
    member = {"instance": "i-a", "url": "u", "created_at": 1.0, "ready_at": 2.0}
    assert PoolMember.model_validate(member).revision is None
    job = {
        "job_id": "j-0123456789",
        "app": "demo/app",
        "state": "queued",
        "event_id": "ev-1",
        "deadline_s": 1.0,
        "retention_s": 1.0,
        "created_at": 1.0,
    }
    assert Job.model_validate(job).revision is None
    assert AppSpec(name="demo/app", command=["x"]).revision is None


def test_a_spec_may_not_choose_its_revision(tmp_path):
    with pytest.raises(GatewayError) as caught:
        parse_spec(b'{"command": ["x"], "revision": 7}', "application/json", "demo/app")
    assert caught.value.status == 422 and "revision" in caught.value.message
    path = tmp_path / "spinyard.yaml"
    path.write_text("name: demo/app\ncommand: [x]\nrevision: 7\n")
    with pytest.raises(ValueError, match="revision is set by publishing"):
        load_spec(path)
    with pytest.raises(ValidationError, match="drain_s"):
        AppSpec(name="demo/app", command=["x"], rollout={"drain_s": 0})
