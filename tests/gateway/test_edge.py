"""Hostile input at the gateway: each case found by generated requests, answered 4xx with the
JSON error body and publishing nothing; routing, method and parser errors with the same body.

The property test (test_property.py) generates thousands more; these are the named ones.
"""

import asyncio
import json
import time

import aiohttp
import msgpack
import pytest
from yarl import URL

from schemas import subjects
from schemas.codec import decode_event
from schemas.events import INPUTS_MAX_DEPTH
from schemas.spec import AppSpec
from tests.gateway.support import page_load

JSON = {"Content-Type": "application/json"}
MSGPACK = {"Content-Type": "application/msgpack"}
BIG = AppSpec(name="demo/big", kind="job", command=["x"], max_input_bytes=60_000)


def run(inputs, **extra) -> dict:
    return {"type": "run_request", "app": "demo/big", "session": "s-1", "inputs": inputs, **extra}


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


HOSTILE = [
    # id, body (dict: sent as JSON; bytes: as is), headers, status, code, text the message has
    ("inputs-too-deep", run(nested(INPUTS_MAX_DEPTH + 1)), None, 422, "invalid_event",
     f"inputs: objects and arrays may nest at most {INPUTS_MAX_DEPTH} levels"),
    ("inputs-far-too-deep", json.dumps(run(nested(900))).encode(), JSON, 422, "invalid_event",
     "inputs:"),
    ("msgpack-timestamp", msgpack.packb(run({"t": msgpack.Timestamp(1, 0)})), MSGPACK, 400,
     "bad_encoding", "inputs.t: msgpack extension types"),
    ("msgpack-ext", msgpack.packb(run({"t": msgpack.ExtType(7, b"x")})), MSGPACK, 400,
     "bad_encoding", "msgpack"),
    ("msgpack-bin-in-inputs", msgpack.packb(run({"b": b"\xff\xfe"})), MSGPACK, 400,
     "bad_encoding", "inputs.b: binary values"),
    ("msgpack-bin-as-app", msgpack.packb({"type": "page_load", "app": b"demo/viz",
     "session": "s-1"}), MSGPACK, 400, "bad_encoding", "app: binary values"),
    ("lone-surrogate-key", b'{"type":"run_request","app":"demo/big","session":"s-1",'
     b'"idempotency_key":"k\\ud800"}', JSON, 400, "bad_encoding", "idempotency_key: strings"),
    ("lone-surrogate-inputs", b'{"type":"run_request","app":"demo/big","session":"s-1",'
     b'"inputs":{"x":["\\udc00"]}}', JSON, 400, "bad_encoding", "inputs.x[0]: strings"),
    ("invalid-utf8-json", b'{"type":"page_load","app":"demo/viz","session":"s-\xff"}', JSON,
     400, "bad_encoding", "JSON"),
    ("invalid-utf8-msgpack", msgpack.packb(page_load(session="s-X")).replace(b"s-X", b"s-\xff"),
     MSGPACK, 400, "bad_encoding", "msgpack"),
    ("session-newline", page_load(session="s-1\n"), None, 422, "invalid_event", "session:"),
    ("app-newline", page_load(app="demo/viz\n"), None, 422, "invalid_event", "app:"),
    ("id-newline", page_load(id="ev-1\n"), None, 422, "invalid_event", "id:"),
    ("cancel-job-id-newline", {"type": "run_cancel", "job_id": "j-0123456789\n"}, None, 422,
     "invalid_event", "job_id:"),
    ("time-nan", b'{"type":"page_load","app":"demo/viz","session":"s-1","time":NaN}', JSON, 400,
     "bad_encoding", "JSON"),
    ("time-infinity", b'{"type":"page_load","app":"demo/viz","session":"s-1","time":1e999}',
     JSON, 400, "bad_encoding", "time: numbers must be finite"),
    ("time-nan-msgpack", msgpack.packb(page_load(time=float("nan"))), MSGPACK, 400,
     "bad_encoding", "time: numbers must be finite"),
    ("idle-inf-msgpack", msgpack.packb({"type": "heartbeat", "app": "demo/viz", "session": "s",
     "visible": True, "focused": True, "idle_s": float("inf")}), MSGPACK, 400, "bad_encoding",
     "idle_s"),
    ("huge-int", run({"n": 2**70}), None, 400, "bad_encoding", "inputs.n: integers"),
    ("wrong-type-inputs", run([1, 2]), None, 422, "invalid_event", "inputs:"),
    ("wrong-type-session", page_load(session=["s"]), None, 422, "invalid_event", "session:"),
    ("wrong-type-job-id", {"type": "run_cancel", "job_id": 5}, None, 422, "invalid_event",
     "job_id:"),
    ("wrong-type-type", {"type": ["page_load"]}, None, 422, "invalid_event", "type:"),
    ("int-map-key", msgpack.packb({1: 2}), MSGPACK, 400, "bad_encoding", "msgpack"),
]  # fmt: skip


@pytest.fixture
async def big(env):
    await env.state.apps.put(BIG.name, BIG)
    return env


@pytest.mark.parametrize(
    ("body", "headers", "status", "code", "says"),
    [pytest.param(*case[1:], id=case[0]) for case in HOSTILE],
)
async def test_hostile_events_get_4xx_and_publish_nothing(big, body, headers, status, code, says):
    kwargs = {"headers": headers} if headers else {}
    got_status, got = await big.post(body, **kwargs)
    assert (got_status, got["error"]["code"]) == (status, code), got
    assert says in got["error"]["message"]
    assert await big.events_published() == 0


async def test_inputs_at_the_depth_limit_are_accepted(big):
    status, answer = await big.post(run(nested(INPUTS_MAX_DEPTH)))
    assert status == 202, answer
    assert await big.events_published() == 1


async def test_event_time_is_the_gateways_clock(env):
    before = time.time()
    status, answer = await env.post(page_load(time=12.5))
    assert status == 202
    msg = await env.js.get_last_msg(subjects.EVENTS_STREAM, subjects.event("page_load", "demo/viz"))
    published = decode_event(msg.data)
    assert before <= published.time <= time.time()
    assert answer["time"] == published.time


async def test_a_nan_status_is_never_served_as_json(env):
    """A status with NaN (published on NATS by someone else) is not turned into bad JSON."""
    await env.publish_status(
        subjects.app_status("demo/viz"),
        {"app": "demo/viz", "state": "pending", "phases": {"requested": float("nan")}},
    )
    async with env.http.get(f"{env.url}/v1/apps/demo/viz/status") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["message"] == "no readable status for demo/viz"


# --- routing, methods, HEAD ---------------------------------------------------------------


async def request(env, method: str, path: str, **kwargs) -> tuple[int, dict, bytes]:
    url = URL(env.url + path, encoded=True)
    async with env.http.request(method, url, **kwargs) as resp:
        return resp.status, dict(resp.headers), await resp.read()


@pytest.mark.parametrize(
    ("method", "path", "status", "code", "allow"),
    [
        ("GET", "/nothing", 404, "not_found", None),
        ("GET", "/v1/nothing", 404, "not_found", None),
        ("GET", "/embed.js/x", 404, "not_found", None),
        ("POST", "/nothing", 404, "not_found", None),
        ("PUT", "/v1/events", 405, "method_not_allowed", "POST"),
        ("GET", "/v1/events", 405, "method_not_allowed", "POST"),
        ("DELETE", "/healthz", 405, "method_not_allowed", "GET,HEAD"),
        ("POST", "/v1/apps", 405, "method_not_allowed", "GET,HEAD"),
        ("GET", "/v1/jobs/j-0123456789%0A", 400, "bad_request", None),
        ("GET", "/v1/jobs/%FF%FE", 400, "bad_request", None),
        ("GET", "/v1/apps/demo/viz%0A/status", 404, "unknown_app", None),
    ],
)
async def test_routing_and_method_errors_have_the_error_body(
    env, method, path, status, code, allow
):
    got, headers, body = await request(env, method, path)
    assert got == status
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["error"]["code"] == code
    assert headers.get("Allow") == allow
    got, headers, body = await request(env, "HEAD", path) if method == "GET" else (0, {}, b"")
    if method == "GET":
        assert (got, body) == (status, b"")
        assert headers["Content-Type"].startswith("application/json")


async def test_head_on_a_status_stream_answers_with_headers_only(env):
    sse = {"Accept": "text/event-stream"}
    timeout = aiohttp.ClientTimeout(total=5)
    for path in ("/v1/apps/demo/viz/status", "/v1/jobs/j-0123456789abcdef/status"):
        status, headers, body = await request(env, "HEAD", path, headers=sse, timeout=timeout)
        assert (status, body) == (404, b"")
        assert headers["Content-Type"].startswith("application/json")
    # The connection is still usable: no stream was written after the HEAD answer.
    assert (await request(env, "GET", "/healthz"))[0] == 200


# --- what aiohttp's parser refuses --------------------------------------------------------


async def raw_exchange(env, data: bytes) -> bytes:
    url = URL(env.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


SECRET = b"Bearer-sekrit-token-1234"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GE\x00T / HTTP/1.1\r\nAuthorization: " + SECRET + b"\r\n\r\n", id="method"),
        pytest.param(b"GET /" + SECRET + b" HTTP/9.9\r\n\r\n", id="version"),
        pytest.param(b"GET / HTTP/1.1\r\nX-A: " + SECRET + b"\x01\r\n\r\n", id="header-char"),
        pytest.param(b"GET / HTTP/1.1\r\nX" + SECRET + b"\r\n\r\n", id="header-no-colon"),
        pytest.param(b"GET /" + b"x" * 9000 + SECRET + b" HTTP/1.1\r\n\r\n", id="line-too-long"),
        pytest.param(b"POST /v1/events HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n"
                     b"X: " + SECRET + b"\r\n\r\n", id="duplicate-length"),
        pytest.param(b"POST /v1/events HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz"
                     + SECRET + b"\r\n", id="bad-chunk"),
    ],
)  # fmt: skip
async def test_unparsable_requests_get_the_error_body_and_no_echo(env, data):
    answer = await raw_exchange(env, data)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.1 400 ", b"HTTP/1.0 400 ")), answer[:200]
    assert b"Content-Type: application/json" in head
    assert json.loads(body) == {
        "error": {"code": "bad_request", "message": "the request is not valid HTTP/1.1"}
    }
    assert SECRET not in answer and b"sekrit" not in answer
