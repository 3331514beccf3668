"""Generated requests against the real gateway and nats-server: no 5xx, every error the JSON
error body, and nothing published for a request that was refused.

Events are built from the patterns in the gateway's own OpenAPI document (so from the models),
then bent: fields swapped for hostile values (NaN, infinities, huge integers, lone surrogates,
msgpack bin and extension types, deep nesting, ids with a trailing newline, wrong types),
dropped, or the body replaced by bytes. Other requests go to every route the document lists,
with any method and hostile path segments. Hypothesis runs in a thread and sends through the
test's event loop, where the gateway runs; a plain NATS subscription on the events subjects
sees every publish. Examples are derandomized, so CI sees the same few thousand each run.
"""

import asyncio
import json
import math
import re
import string

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from dispatcher.backends.local.secrets import SecretFiles
from schemas import subjects
from schemas.codec import decode_event
from schemas.events import INPUTS_MAX_DEPTH
from schemas.spec import AppSpec

BIG = AppSpec(name="demo/big", kind="job", command=["x"], max_input_bytes=60_000)
APPS = ["demo/viz", "demo/per", "demo/job", "demo/big", "demo/nope"]
EVENT_EXAMPLES = 2000
ROUTE_EXAMPLES = 1000
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND"]
CONTENT_TYPES = [
    "application/json",
    "application/msgpack",
    "application/x-msgpack",
    "text/plain",
    "application/json; charset=latin-1",
    None,
]


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


# Text as browsers and scripts can send it: JSON escapes can carry lone surrogates.
TEXT = st.text(max_size=12) | st.sampled_from(["\ud800", "k\udfff", "a\n", "\x00", "é"])
HOSTILE = st.one_of(
    st.sampled_from(
        [
            math.nan,
            math.inf,
            -math.inf,
            2**64,
            -(2**63) - 1,
            "x\ud800",
            "\udfff",
            b"\xff\xfe",
            b"bytes",
            msgpack.Timestamp(0, 0),
            msgpack.ExtType(3, b"\x00"),
            nested(INPUTS_MAX_DEPTH + 1),
            nested(400),
            None,
            [],
            {},
            "",
            "s-1\n",
            "demo/viz\n",
            "j-0123456789\n",
            "j-x.>",
            "a" * 300,
            "\x00",
            True,
        ]
    ),
    st.text(max_size=20),
    st.integers(),
    st.floats(),
)
PLAIN = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10) | HOSTILE,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=12,
)


def field_strategies(doc: dict) -> dict[str, st.SearchStrategy]:
    """Valid values of the browser events' fields, from the document's patterns."""
    props = doc["components"]["schemas"]["RunCancel"]["properties"]
    pattern = doc["components"]["schemas"]["PageLoad"]["properties"]["session"]["pattern"]
    return {
        "app": st.sampled_from(APPS[:4]),
        "session": st.from_regex(pattern, fullmatch=True),
        "id": st.from_regex(
            doc["components"]["schemas"]["PageLoad"]["properties"]["id"]["pattern"], fullmatch=True
        ),
        "job_id": st.from_regex(props["job_id"]["pattern"], fullmatch=True),
        "visible": st.booleans(),
        "focused": st.booleans(),
        "idle_s": st.floats(min_value=0, max_value=1e6),
        "inputs": st.dictionaries(TEXT, PLAIN, max_size=4),
        "idempotency_key": TEXT,
        "time": st.floats(allow_nan=False, allow_infinity=False),
    }


FIELDS = {
    "page_load": ["app", "session", "id", "time"],
    "heartbeat": ["app", "session", "id", "visible", "focused", "idle_s"],
    "run_request": ["app", "session", "id", "inputs", "idempotency_key"],
    "run_cancel": ["job_id", "id"],
}


@st.composite
def events(draw, fields: dict[str, st.SearchStrategy]) -> tuple[str, bytes, str | None]:
    kind = draw(st.sampled_from([*FIELDS, *FIELDS, *FIELDS, "reaper_tick", "job_update", "x"]))
    names = FIELDS.get(kind, ["app", "id"])
    # Mostly one field bent and the rest valid, so the bent one is what the gateway meets.
    mode = draw(st.sampled_from(["valid", "one", "one", "one", "any"]))
    bent = draw(st.sampled_from(names))
    event: dict = {"type": kind}
    for name in names:
        if mode == "any":
            choice = draw(st.sampled_from(["valid", "hostile", "missing"]))
        else:
            choice = "valid" if mode == "valid" or name != bent else "hostile"
            if choice == "hostile" and draw(st.integers(0, 5)) == 0:
                choice = "missing"
        if choice == "valid":
            event[name] = draw(fields[name])
        elif choice == "hostile":
            event[name] = draw(HOSTILE)
    if draw(st.booleans()):
        event[draw(st.sampled_from(["extra"] * 8 + ["type", "v"]))] = draw(PLAIN)
    shape = draw(st.sampled_from(["json"] * 4 + ["msgpack"] * 4 + ["bytes", "not-an-object"]))
    content_type = None if draw(st.integers(0, 4)) else draw(st.sampled_from(CONTENT_TYPES))
    if shape == "bytes":
        return "POST", draw(st.binary(max_size=200)), content_type
    body_of: object = event if shape != "not-an-object" else draw(PLAIN)
    try:
        if shape == "msgpack":
            data = msgpack.packb(body_of, use_bin_type=True)
            return "POST", data, content_type or "application/msgpack"
    except (TypeError, ValueError, OverflowError, UnicodeEncodeError):
        pass  # msgpack cannot carry it (a lone surrogate, a huge int): send JSON
    try:
        data = json.dumps(body_of, default=lambda v: repr(v)).encode()
    except (TypeError, ValueError, RecursionError):
        data = b"{"
    return "POST", data, content_type or "application/json"


SEGMENT = st.one_of(
    st.sampled_from(["demo", "viz", "job", "j-0123456789abcdef", "i-0123456789abcdef", ""]),
    st.sampled_from(["%FF", "%0A", "%00", "..", "%2F", "%25", "%C0%AF", "a%0D%0Ab", "~", ";x"]),
    st.text(alphabet=string.ascii_letters + string.digits + "-_.", max_size=12),
)


@st.composite
def route_requests(draw, templates: list[str]) -> tuple[str, str, bytes, str | None]:
    template = draw(st.sampled_from(templates))
    path = re.sub(r"\{\w+\}", lambda _: draw(SEGMENT), template)
    if draw(st.booleans()):
        path += draw(st.sampled_from(["?session=s-1", "?session=%FF", "?token=x", "?a=%00"]))
    method = draw(st.sampled_from(METHODS))
    body = draw(st.binary(max_size=64)) if method in ("POST", "PUT", "PATCH") else b""
    return method, path, body, draw(st.sampled_from(CONTENT_TYPES))


def check_answer(method: str, status: int, headers, body: bytes) -> str | None:
    """Assert the answer keeps the promises; the accepted event's id, if one was accepted."""
    assert status < 500, (status, body[:300])
    if status >= 400:
        assert headers.get("Content-Type", "").startswith("application/json"), (status, headers)
        if method != "HEAD":
            error = json.loads(body)["error"]
            assert isinstance(error["code"], str) and isinstance(error["message"], str)
    if status == 202:
        return json.loads(body)["id"]
    return None


@pytest.fixture
async def gateway(env, tmp_path):
    """A gateway with authentication off and every route, the secrets ones too."""
    await env.state.apps.put(BIG.name, BIG)
    env.url = (await env.start(secrets=SecretFiles(tmp_path / "secrets"))).url
    return env


async def test_generated_requests_never_5xx_and_refusals_publish_nothing(gateway):
    env = gateway
    loop = asyncio.get_running_loop()
    async with env.http.get(f"{env.url}/v1/openapi.json") as resp:
        doc = await resp.json()
    published: list = []

    async def seen(msg) -> None:
        published.append(msg)

    sub = await env.nc.subscribe(f"{subjects.EVENTS}.>", cb=seen)
    accepted: set[str] = set()
    answered = {"events": 0, "routes": 0, "refused": 0}

    async def send(method: str, path: str, body: bytes, content_type: str | None):
        headers = {"Content-Type": content_type} if content_type else {}
        url = URL(env.url + path, encoded=True)
        async with env.http.request(method, url, data=body or None, headers=headers) as resp:
            return resp.status, resp.headers, await resp.read()

    def exchange(method, path, body, content_type) -> None:
        future = asyncio.run_coroutine_threadsafe(send(method, path, body, content_type), loop)
        status, headers, answer = future.result(timeout=30)
        event_id = check_answer(method, status, headers, answer)
        if event_id is not None:
            accepted.add(event_id)
        answered["refused"] += status >= 400

    common = settings(
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )

    @settings(common, max_examples=EVENT_EXAMPLES)
    @given(request=events(field_strategies(doc)))
    def generated_events(request):
        method, body, content_type = request
        exchange(method, "/v1/events", body, content_type)
        answered["events"] += 1

    @settings(common, max_examples=ROUTE_EXAMPLES)
    @given(request=route_requests(sorted(doc["paths"])))
    def generated_routes(request):
        exchange(*request)
        answered["routes"] += 1

    await asyncio.to_thread(generated_events)
    await asyncio.to_thread(generated_routes)
    await env.nc.flush()
    await sub.unsubscribe()

    assert answered["events"] >= EVENT_EXAMPLES * 0.9 and answered["routes"] >= ROUTE_EXAMPLES * 0.9
    assert accepted and answered["refused"] > answered["events"] // 2  # both sides were tried
    ids = {msg.headers["Nats-Msg-Id"] for msg in published}
    assert ids == accepted  # every accepted event published; nothing refused was
    for msg in published:  # and what was published is valid, and valid JSON for a browser
        event = decode_event(msg.data)
        json.dumps(event.model_dump(mode="json"), allow_nan=False)
