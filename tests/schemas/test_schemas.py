"""The public contract: every model round-trips through msgpack and JSON; bad input is named."""

import json

import msgpack
import pytest
from pydantic import ValidationError

from dispatcher.embedded.specs import find_specs
from schemas import subjects
from schemas.codec import DecodeError, decode, decode_event, encode, encode_json
from schemas.errors import ErrorBody, ErrorInfo
from schemas.events import (
    Heartbeat,
    JobUpdate,
    PageLoad,
    PoolRefill,
    ReaperTick,
    RunCancel,
    RunRequest,
    job_id_for,
)
from schemas.names import JOB_ID_RE
from schemas.spec import AppSpec, load_spec
from schemas.status import AppState, AppStatus, JobState, JobStatus, Phases, ResultRef
from tests.helpers import ROOT

EVENTS = [
    PageLoad(app="demo/hello", session="s-1"),
    Heartbeat(app="demo/hello", session="s-1", visible=True, focused=False, idle_s=4.5),
    RunRequest(
        app="demo/model", session="s-1", inputs={"n": [1, 2.5, "x", None]}, idempotency_key="k"
    ),
    RunCancel(job_id="j-0123456789abcdef"),
    ReaperTick(id="tick-1"),
    PoolRefill(app="demo/hello", instance="i-0123456789abcdef"),
    JobUpdate(job_id="j-0123456789abcdef", state="failed", exit_code=3, log_tail="boom"),
]
STATUSES = [
    AppStatus(
        app="demo/hello",
        state=AppState.READY,
        url="http://x/apps/demo/hello/i-1/",
        phases=Phases(requested=1.0, scheduled=1.1, started=1.2, ready=1.5, warm=True),
    ),
    AppStatus(
        app="demo/hello",
        state=AppState.FAILED,
        error=ErrorInfo(code="start_failed", message="m"),
        session="s-1",
    ),
    JobStatus(
        job_id="j-0123456789abcdef",
        app="demo/model",
        state=JobState.SUCCEEDED,
        results=[
            ResultRef(
                key="results/j-0123456789abcdef/a.json", url="http://s3/a", name="a.json", size=3
            )
        ],
    ),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_every_event_round_trips_through_msgpack_and_json(event):
    assert decode_event(encode(event)) == event
    assert decode_event(encode_json(event), "application/json") == event
    assert decode(type(event), encode(event)) == event


@pytest.mark.parametrize("status", STATUSES, ids=lambda s: type(s).__name__ + ":" + s.state)
def test_every_status_round_trips(status):
    assert decode(type(status), encode(status)) == status
    assert type(status).model_validate(json.loads(encode_json(status))) == status


def test_spec_and_error_round_trip():
    spec = AppSpec(name="demo/x", command=["{python}", "app.py"], pool={"size": 2})
    assert decode(AppSpec, encode(spec)) == spec
    body = ErrorBody.of("unknown_app", "no app")
    assert json.loads(encode_json(body)) == {"error": {"code": "unknown_app", "message": "no app"}}


def test_contract_core_fields_are_exact():
    """The stable core of DESIGN.md's contract, by name."""
    assert set(json.loads(encode_json(EVENTS[0]))) >= {"type", "app", "session", "id", "time"}
    assert set(json.loads(encode_json(EVENTS[1]))) >= {
        "type",
        "app",
        "session",
        "visible",
        "focused",
        "idle_s",
    }
    assert set(json.loads(encode_json(EVENTS[2]))) >= {
        "type",
        "app",
        "session",
        "inputs",
        "idempotency_key",
    }
    assert set(json.loads(encode_json(EVENTS[3]))) >= {"type", "job_id"}
    assert set(json.loads(encode_json(STATUSES[0]))) >= {"app", "state", "url", "phases", "error"}
    assert set(json.loads(encode_json(STATUSES[2]))) >= {
        "job_id",
        "app",
        "state",
        "results",
        "error",
    }


def test_unknown_fields_are_ignored_so_newer_clients_still_work():
    raw = msgpack.packb({"type": "page_load", "app": "demo/x", "session": "s", "added_later": 1})
    assert decode_event(raw).app == "demo/x"


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "page_load", "app": "Demo/X", "session": "s"},  # uppercase
        {"type": "page_load", "app": "demo", "session": "s"},  # no title
        {"type": "page_load", "app": "demo/x/y", "session": "s"},
        {"type": "page_load", "app": "demo/x", "session": "has space"},
        {"type": "page_load", "app": "demo/x", "session": ""},
        {
            "type": "heartbeat",
            "app": "demo/x",
            "session": "s",
            "visible": True,
            "focused": True,
            "idle_s": -1,
        },
        {"type": "heartbeat", "app": "demo/x", "session": "s"},  # missing fields
        {"type": "teleport", "app": "demo/x", "session": "s"},
        {"app": "demo/x", "session": "s"},  # no type
    ],
)
def test_invalid_events_are_rejected_with_a_reason(raw):
    with pytest.raises(ValidationError) as err:
        decode_event(msgpack.packb(raw))
    assert err.value.errors()[0]["msg"]


def test_bytes_that_are_not_msgpack_or_json_raise_decode_error():
    with pytest.raises(DecodeError):
        decode_event(b"\xc1\xc1")
    with pytest.raises(DecodeError):
        decode_event(b"{not json", "application/json")


def test_subjects_follow_the_documented_tree():
    assert subjects.event("page_load", "demo/hello") == "spinyard.v1.events.page_load.demo.hello"
    assert subjects.app_status("demo/hello") == "spinyard.v1.status.app.demo.hello"
    assert subjects.app_status("demo/hello", "s-1") == "spinyard.v1.status.session.demo.hello.s-1"
    assert subjects.job_status("j-1") == "spinyard.v1.status.job.j-1"
    assert subjects.dead("page_load") == "spinyard.v1.dead.page_load"
    with pytest.raises(ValueError):
        subjects.event("page_load", "demo.hello/x")  # a dot would split the subject


def test_job_ids_are_stable_per_idempotency_key_and_valid():
    a = job_id_for("demo/m", "s-1", "k1", "ev-1")
    assert a == job_id_for("demo/m", "s-1", "k1", "ev-2")  # same key, other event: same run
    assert a != job_id_for("demo/other", "s-1", "k1", "ev-1")  # keys are per app
    assert a != job_id_for("demo/m", "s-2", "k1", "ev-1")  # and per session
    assert job_id_for("demo/m", "s-1", None, "ev-1") != job_id_for("demo/m", "s-1", None, "ev-2")
    assert JOB_ID_RE.match(a)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": "nope"}, "name"),
        ({"command": []}, "command"),
        ({"readiness_path": "healthz"}, "readiness_path"),
        ({"entry_path": "/main"}, "entry_path"),
        ({"sharing": "everyone"}, "sharing"),
        ({"pool": {"size": -1}}, "pool.size"),
        ({"idle": {"since_heartbeat_s": 0}}, "idle.since_heartbeat_s"),
        ({"embed_origins": ["evil.example"]}, "embed_origins"),
        ({"kind": "job", "preload": ["numpy", "not a module"]}, "preload"),
        ({"kind": "job", "preload": ["os..path"]}, "preload"),
        ({"preload": ["numpy"]}, "preload is for job apps"),
        ({"outputs": ["../escape"]}, ""),
        ({"kind": "job", "command": ["x", "--port={port}"]}, "command[1]: {port} has no value"),
        ({"kind": "job", "env": {"AT": "{prefix}"}}, "env['AT']: {prefix} has no value"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_specs_name_the_field(change, field):
    with pytest.raises(ValidationError) as err:
        AppSpec(**({"name": "demo/x", "command": ["x"]} | change))
    assert field in str(err.value)


def test_load_spec_resolves_workdir_and_reports_bad_files(tmp_path):
    (tmp_path / "ok.yaml").write_text("name: demo/x\ncommand: [run]\nworkdir: sub\n")
    assert load_spec(tmp_path / "ok.yaml").workdir == str(tmp_path / "sub")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        load_spec(tmp_path / "list.yaml")


def test_every_example_spec_is_valid():
    paths = find_specs(ROOT / "examples")
    names = {load_spec(p).name for p in paths}
    assert {"demo/hello", "demo/classroom", "demo/sliders", "demo/epidemic"} <= names


@pytest.mark.parametrize(
    "origin", ["https://*.example.org", "https://site.example/path", "site.example"]
)
def test_embed_origins_must_be_exact_origins(origin):
    with pytest.raises(ValidationError):
        AppSpec(name="demo/x", command=["x"], embed_origins=[origin])


def test_a_job_app_may_keep_warm_runners_with_preloaded_modules():
    spec = AppSpec(
        name="demo/j",
        kind="job",
        command=["{python}", "model.py"],
        pool={"size": 2},
        preload=["json", "email.mime.text", "_private"],
    )
    assert spec.pool.size == 2
    assert spec.preload == ["json", "email.mime.text", "_private"]
