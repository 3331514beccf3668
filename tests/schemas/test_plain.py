"""Validation at the edge, below HTTP: whole-string names, plain data, finite numbers,
and decoding that refuses msgpack extension types and JSON's NaN."""

import json
import math

import msgpack
import pytest
from pydantic import ValidationError

from schemas import names
from schemas.codec import DecodeError, decode_event, loads
from schemas.events import INPUTS_MAX_DEPTH, Heartbeat, PageLoad, RunCancel, RunRequest
from schemas.plain import NotPlainError, check_plain
from schemas.status import AppStatus, Phases


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize(
    ("check", "good"),
    [
        (names.check_app, "demo/viz"),
        (names.check_session, "s-1"),
        (names.check_event_id, "ev-1.2:3"),
        (names.check_job_id, "j-0123456789"),
    ],
)
@pytest.mark.parametrize("tail", ["\n", "\r\n", " ", "\x00", ".>", "\u2028"])
def test_names_must_match_in_full(check, good, tail):
    assert check(good) == good
    with pytest.raises(ValueError):
        check(good + tail)
    with pytest.raises(ValueError):
        check(tail + good)


@pytest.mark.parametrize(
    ("regex", "good"),
    [
        (names.APP_RE, "demo/viz"),
        (names.SESSION_RE, "s-1"),
        (names.EVENT_ID_RE, "ev-1"),
        (names.JOB_ID_RE, "j-0123456789"),
        (names.INSTANCE_ID_RE, "i-0123456789"),
    ],
)
def test_compiled_patterns_refuse_a_trailing_newline_with_match_too(regex, good):
    assert regex.match(good)
    assert regex.match(good + "\n") is None


def test_models_refuse_ids_with_a_newline():
    with pytest.raises(ValidationError, match="session must"):
        PageLoad(app="demo/viz", session="s-1\n")
    with pytest.raises(ValidationError, match="id must"):
        PageLoad(app="demo/viz", session="s-1", id="ev-1\n")
    with pytest.raises(ValidationError, match="job_id must"):
        RunCancel(job_id="j-0123456789\n")
    with pytest.raises(ValidationError, match="app must"):
        RunCancel(job_id="j-0123456789", app="demo/viz\n")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_numbers_must_be_finite(bad):
    with pytest.raises(ValidationError, match="finite"):
        PageLoad(app="demo/viz", session="s-1", time=bad)
    with pytest.raises(ValidationError, match="finite"):
        Heartbeat(app="demo/viz", session="s-1", visible=True, focused=True, idle_s=bad)
    with pytest.raises(ValidationError, match="finite"):
        AppStatus(app="demo/viz", state="pending", phases=Phases(requested=bad))
    with pytest.raises(ValidationError, match="finite"):
        RunRequest(app="demo/job", session="s-1", inputs={"x": [1, bad]})


def test_inputs_nest_at_most_the_documented_depth():
    RunRequest(app="demo/job", session="s-1", inputs=nested(INPUTS_MAX_DEPTH))
    with pytest.raises(ValidationError, match=f"at most {INPUTS_MAX_DEPTH} levels"):
        RunRequest(app="demo/job", session="s-1", inputs=nested(INPUTS_MAX_DEPTH + 1))
    deep = {"x": [[[[[[]]]]]]}
    for _ in range(2000):  # far past the recursion limit: the walk is iterative
        deep = {"x": deep}
    with pytest.raises(ValidationError, match="inputs"):
        RunRequest(app="demo/job", session="s-1", inputs=deep)


@pytest.mark.parametrize(
    ("value", "where", "says"),
    [
        ({"a": [1, {"b": b"\xff"}]}, "inputs.a[1].b", "msgpack bin"),
        ({"t": msgpack.Timestamp(0, 0)}, "inputs.t", "extension"),
        ({"s": "x\ud800y"}, "inputs.s", "surrogates"),
        ({"\udfff": 1}, "inputs", "keys"),
        ({"n": 2**64}, "inputs.n", "64 bits"),
        ({"n": -(2**63) - 1}, "inputs.n", "64 bits"),
        ({"f": float("inf")}, "inputs.f", "finite"),
        ({"o": object()}, "inputs.o", "object values"),
    ],
)
def test_check_plain_names_the_place(value, where, says):
    with pytest.raises(NotPlainError, match=says) as info:
        check_plain(value, where="inputs")
    assert info.value.where == where


def test_check_plain_takes_plain_data():
    check_plain({"a": [1, -(2**63), 2**64 - 1, 2.5, "ü", None, True, {"b": []}]}, max_depth=4)
    with pytest.raises(NotPlainError):
        check_plain({"a": [{"b": []}]}, max_depth=3)


def test_decoding_refuses_extension_types_and_json_constants():
    with pytest.raises(DecodeError):
        loads(msgpack.packb({"x": msgpack.ExtType(5, b"\x00")}))
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        with pytest.raises(DecodeError):
            loads(b'{"time": ' + constant + b"}", "application/json")
    with pytest.raises(DecodeError):
        loads(b'{"s": "\xff"}', "application/json")  # not UTF-8
    with pytest.raises(DecodeError):
        loads(msgpack.packb({"s": "x"}).replace(b"x", b"\xff"))


def test_a_nan_published_on_nats_does_not_validate():
    data = msgpack.packb({"type": "page_load", "app": "demo/viz", "session": "s", "time": math.nan})
    with pytest.raises(ValidationError, match="finite"):
        decode_event(data)
    assert json.loads(PageLoad(app="demo/viz", session="s").model_dump_json())["time"] > 0
