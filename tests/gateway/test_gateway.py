"""The gateway over real HTTP against a real nats-server, and a real app server behind its proxy.

Each rejected request is checked twice: the answer (status and error body)
and the events stream (nothing was published). The only stand-in is a
backend whose `target()` names the test's own aiohttp app.
"""

import asyncio
import json
import socket
import time

import aiohttp
import msgpack
import pytest
from yarl import URL

from dispatcher.gateway import SESSION, GatewayError
from dispatcher.gateway.keys import STREAMS
from handlers.deployments import SHARED, Deployment, slot_key
from schemas import subjects
from schemas.codec import decode_event
from schemas.events import Heartbeat, PageLoad, RunCancel, RunRequest
from schemas.names import JOB_ID_RE
from schemas.status import AppState, AppStatus
from tests.gateway.support import INSTANCE, PREFIX, page_load
from tests.helpers import wait_for

# --- events -------------------------------------------------------------------------------


async def test_accepted_page_load_is_published_as_msgpack_with_dedupe_id(env):
    status, body = await env.post(page_load())
    assert status == 202
    assert body["id"].startswith("ev-")
    msg = await env.js.get_msg(subjects.EVENTS_STREAM, seq=1)
    assert (
        msg.subject
        == subjects.event("page_load", "demo/viz")
        == "spinyard.v1.events.page_load.demo.viz"
    )
    assert msg.headers["Nats-Msg-Id"] == body["id"]
    event = decode_event(msg.data)
    assert isinstance(event, PageLoad)
    assert (event.id, event.app, event.session) == (body["id"], "demo/viz", "s-1")
    assert await env.events_published() == 1


async def test_msgpack_body_is_accepted(env):
    hb = {
        "type": "heartbeat",
        "app": "demo/viz",
        "session": "s-1",
        "visible": True,
        "focused": False,
        "idle_s": 4,
    }
    headers = {"Content-Type": "application/msgpack"}
    status, body = await env.post(msgpack.packb(hb), headers=headers)
    assert status == 202
    msg = await env.js.get_last_msg(subjects.EVENTS_STREAM, subjects.event("heartbeat", "demo/viz"))
    event = decode_event(msg.data)
    assert isinstance(event, Heartbeat)
    assert (event.id, event.visible, event.focused, event.idle_s) == (body["id"], True, False, 4)


async def test_a_retried_event_id_is_published_once(env):
    for _ in range(2):
        status, body = await env.post(page_load(id="ev-retry-1"))
        assert (status, body["id"]) == (202, "ev-retry-1")
    assert await env.events_published() == 1


async def test_run_request_gets_a_fresh_job_id_whatever_the_client_says(env):
    event = {
        "type": "run_request",
        "app": "demo/job",
        "session": "s-1",
        "inputs": {"n": 3},
        "job_id": "j-chosenbyclient",
    }
    status, body = await env.post(event)
    assert status == 202
    assert JOB_ID_RE.match(body["job_id"]) and body["job_id"] != "j-chosenbyclient"
    msg = await env.js.get_last_msg(
        subjects.EVENTS_STREAM, subjects.event("run_request", "demo/job")
    )
    published = decode_event(msg.data)
    assert isinstance(published, RunRequest)
    assert (published.job_id, published.inputs) == (body["job_id"], {"n": 3})


async def test_run_cancel_goes_to_the_job_subject(env):
    status, _ = await env.post({"type": "run_cancel", "job_id": "j-0123456789abcdef0123"})
    assert status == 202
    msg = await env.js.get_msg(subjects.EVENTS_STREAM, seq=1)
    assert msg.subject == subjects.event_for("run_cancel", "j-0123456789abcdef0123")
    assert isinstance(decode_event(msg.data), RunCancel)


JSON = {"Content-Type": "application/json"}
MSGPACK = {"Content-Type": "application/msgpack"}


HB_JOB = {"type": "heartbeat", "app": "demo/job", "session": "s-1", "visible": True,
          "focused": True, "idle_s": 0}  # fmt: skip
BAD_EVENTS = [
    # id, body, headers, status, code, text the message must contain
    ("garbage-json", b"{not json", JSON, 400, "bad_encoding", "JSON"),
    ("garbage-msgpack", b"\xc1\xff garbage", MSGPACK, 400, "bad_encoding", "msgpack"),
    ("empty", b"", JSON, 400, "bad_encoding", "JSON"),
    ("not-an-object", b"[1, 2]", JSON, 422, "invalid_event", "object"),
    ("missing-field", {"type": "heartbeat", "app": "demo/viz", "session": "s-1"}, None, 422,
     "invalid_event", "visible: Field required"),
    ("bad-session", page_load(session="bad session!"), None, 422, "invalid_event",
     "session: session must"),
    ("bad-app-name", page_load(app="Demo/Viz"), None, 422, "invalid_event",
     "app: app must be 'owner/title'"),
    ("header-injecting-id", page_load(id="ev-1\r\nX-Evil: 1"), None, 422, "invalid_event", "id:"),
    ("unknown-type", {"type": "teleport"}, None, 422, "invalid_event", "type: must be one of"),
    ("no-type", {"app": "demo/viz", "session": "s-1"}, None, 422, "invalid_event", "type:"),
    ("reaper-tick", {"type": "reaper_tick"}, None, 422, "invalid_event", "internal"),
    ("pool-refill", {"type": "pool_refill", "app": "demo/viz", "instance": INSTANCE}, None, 422,
     "invalid_event", "internal"),
    ("job-update", {"type": "job_update", "job_id": "j-0123456789", "state": "succeeded"}, None,
     422, "invalid_event", "internal"),
    ("wildcard-job-id", {"type": "run_cancel", "job_id": "j-x.>"}, None, 422, "invalid_event",
     "job_id:"),
    ("unknown-app", page_load(app="demo/nope"), None, 404, "unknown_app", "demo/nope"),
    ("inputs-over-app-limit", {"type": "run_request", "app": "demo/job", "session": "s-1",
     "inputs": {"x": "y" * 100}}, None, 413, "too_large", "inputs: "),
    ("page-load-for-job", page_load(app="demo/job"), None, 422, "wrong_kind", "needs a viz app"),
    ("heartbeat-for-job", HB_JOB, None, 422, "wrong_kind", "viz"),
    ("run-for-viz", {"type": "run_request", "app": "demo/viz", "session": "s-1"}, None, 422,
     "wrong_kind", "needs a job app"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "headers", "status", "code", "says"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_EVENTS],
)
async def test_bad_events_are_rejected_and_nothing_is_published(
    env, body, headers, status, code, says
):
    kwargs = {"headers": headers} if headers else {}
    got_status, got = await env.post(body, **kwargs)
    assert got_status == status
    assert got["error"]["code"] == code
    message = got["error"]["message"]
    assert says in message
    assert "ValidationError" not in message and "pydantic" not in message
    assert await env.events_published() == 0


async def test_too_large_by_content_length_and_by_chunked_body(env):
    limit = env.settings.gateway.max_body_bytes
    big = json.dumps(page_load(pad="x" * limit)).encode()
    status, body = await env.post(big, headers=JSON)
    assert (status, body["error"]["code"]) == (413, "too_large")

    async def chunks():
        yield b'{"type": "page_load", "app": "demo/viz", "session": "s-1", "pad": "'
        for _ in range(limit // 1024 + 2):
            yield b"x" * 1024
        yield b'"}'

    status, body = await env.post(chunks(), headers=JSON)
    assert (status, body["error"]["code"]) == (413, "too_large")
    assert await env.events_published() == 0


async def test_auth_hook_can_reject_events_and_status(env):
    calls = []

    def auth(request, app, job_id):
        calls.append((app, job_id, request.get(SESSION)))
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        token = token or request.query.get("token", "")
        if token != "good":
            raise GatewayError(401, "unauthorized", "a bearer token is needed")

    url = (await env.start(auth=auth)).url
    status, body = await env.post(page_load(), url=url)
    assert (status, body["error"]["code"]) == (401, "unauthorized")
    assert await env.events_published() == 0
    status, _ = await env.post(page_load(), url=url, headers={"Authorization": "Bearer good"})
    assert status == 202
    async with env.http.get(f"{url}/v1/apps/demo/per/status?session=s-9") as resp:
        assert resp.status == 401
    async with env.http.get(f"{url}/v1/apps/demo/per/status?session=s-9&token=good") as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    async with env.http.get(f"{url}/v1/jobs/j-0123456789abcdef/status?token=good") as resp:
        assert resp.status == 404
    assert calls == [
        ("demo/viz", None, "s-1"),
        ("demo/viz", None, "s-1"),
        ("demo/per", None, "s-9"),
        ("demo/per", None, "s-9"),
        (None, "j-0123456789abcdef", None),
    ]


async def test_nats_down_gives_503_and_unhealthy(env, nats_server):
    async with env.http.get(f"{env.url}/healthz") as resp:
        assert (resp.status, await resp.json()) == (200, {"ok": True, "nats": True})
    nats_server.stop()

    async def unhealthy():
        async with env.http.get(f"{env.url}/healthz") as resp:
            return resp.status == 503 and (await resp.json())["nats"] is False

    await wait_for(unhealthy, what="healthz to see NATS gone")
    status, body = await env.post(page_load())
    assert (status, body["error"]["code"]) == (503, "unavailable")
    # Back on the same port, the gateway recovers by itself (and its client, reconnected,
    # closes cleanly at the end instead of being cut off mid-reconnect).
    nats_server.start()

    async def healthy():
        async with env.http.get(f"{env.url}/healthz") as resp:
            return resp.status == 200

    await wait_for(healthy, timeout=20, what="healthz to see NATS back")


# --- apps and status ----------------------------------------------------------------------


async def test_apps_are_listed(env):
    async with env.http.get(f"{env.url}/v1/apps") as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        apps = await resp.json()
    assert [a["name"] for a in apps] == ["demo/job", "demo/per", "demo/viz"]
    assert apps[2] == {
        "name": "demo/viz",
        "kind": "viz",
        "sharing": "shared",
        "pool": {"size": 0},
        "description": "A shared viz app",
    }
    assert apps[1]["sharing"] == "per_session" and apps[0]["kind"] == "job"


async def test_status_snapshot_is_404_until_a_status_is_published(env):
    url = f"{env.url}/v1/apps/demo/viz/status"
    async with env.http.get(url) as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"
    ready = AppStatus(app="demo/viz", state=AppState.READY, url="http://gw/apps/demo/viz/i-1/")
    await env.publish_status(subjects.app_status("demo/viz"), ready)
    async with env.http.get(url) as resp:
        assert resp.status == 200
        got = await resp.json()
    assert (got["state"], got["url"], got["error"]) == ("ready", ready.url, None)
    async with env.http.get(f"{env.url}/v1/apps/demo/nope/status") as resp:
        assert resp.status == 404 and (await resp.json())["error"]["code"] == "unknown_app"


async def test_job_status_snapshot(env):
    job_id = "j-0123456789abcdef0123"
    async with env.http.get(f"{env.url}/v1/jobs/{job_id}") as resp:
        assert resp.status == 404
    done = {
        "job_id": job_id,
        "app": "demo/job",
        "state": "succeeded",
        "results": [{"key": f"results/{job_id}/out.csv", "url": "http://s3/x"}],
        "error": None,
    }
    await env.publish_status(subjects.job_status(job_id), done)
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/status"):
        async with env.http.get(env.url + path) as resp:
            assert (resp.status, await resp.json()) == (200, done)
    async with env.http.get(f"{env.url}/v1/jobs/not-a-job") as resp:
        assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_request"


async def test_per_session_status_needs_a_session(env):
    base = f"{env.url}/v1/apps/demo/per/status"
    async with env.http.get(base) as resp:
        assert resp.status == 400
        assert "session" in (await resp.json())["error"]["message"]
    async with env.http.get(base, params={"session": "a.b"}) as resp:
        assert resp.status == 400
    await env.publish_status(
        subjects.app_status("demo/per", "s-7"),
        AppStatus(app="demo/per", state=AppState.STARTING, session="s-7"),
    )
    async with env.http.get(base, params={"session": "s-7"}) as resp:
        assert resp.status == 200 and (await resp.json())["session"] == "s-7"
    async with env.http.get(base, params={"session": "s-8"}) as resp:
        assert resp.status == 404


# --- Server-Sent Events -------------------------------------------------------------------

SSE = {"Accept": "text/event-stream"}


async def next_event(resp: aiohttp.ClientResponse, timeout: float = 5.0) -> dict:
    """The next SSE event (its fields); comments and the retry line are skipped."""
    fields: dict = {}
    async with asyncio.timeout(timeout):
        while True:
            raw = await resp.content.readline()
            if not raw:
                raise EOFError("stream ended")
            line = raw.decode().rstrip("\n")
            if not line:
                if "data" in fields:
                    fields["json"] = json.loads(fields["data"])
                    return fields
                fields = {}
                continue
            if not line.startswith(":"):
                key, _, value = line.partition(":")
                fields[key] = value.removeprefix(" ")


async def test_sse_sends_current_status_first_then_changes_and_cleans_up(env):
    subject = subjects.app_status("demo/viz")
    await env.publish_status(subject, AppStatus(app="demo/viz", state=AppState.STARTING))
    async with env.http.get(f"{env.url}/v1/apps/demo/viz/status", headers=SSE) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        first = await next_event(resp)
        assert first["event"] == "status" and first["json"]["state"] == "starting"
        assert (await env.metrics())[("spinyard_gateway_sse_clients", frozenset())] == 1
        await env.publish_status(
            subject, AppStatus(app="demo/viz", state=AppState.READY, url="http://x/")
        )
        second = await next_event(resp)
        assert second["json"]["state"] == "ready" and int(second["id"]) > int(first["id"])

    async def closed():
        gauge = (await env.metrics())[("spinyard_gateway_sse_clients", frozenset())]
        consumers = (await env.js.stream_info(subjects.STATUS_STREAM)).state.consumer_count
        return gauge == 0 and consumers == 0

    await wait_for(closed, what="the stream's consumer to be gone")


async def test_sse_without_status_waits_then_keeps_alive(env):
    env.settings.gateway.sse_keepalive_s = 0.1
    url = (await env.start()).url
    job_id = "j-0123456789abcdef0123"
    async with env.http.get(f"{url}/v1/jobs/{job_id}/status", headers=SSE) as resp:
        assert resp.status == 200
        async with asyncio.timeout(5):
            while (await resp.content.readline()) != b": keepalive\n":
                pass
        await env.publish_status(subjects.job_status(job_id), {"job_id": job_id, "state": "queued"})
        event = await next_event(resp)
        assert event["json"] == {"job_id": job_id, "state": "queued"}


async def test_shutdown_ends_open_streams_promptly(env):
    runner = await env.start()
    async with env.http.get(f"{runner.url}/v1/apps/demo/viz/status", headers=SSE) as resp:
        assert resp.status == 200
        assert runner.app[STREAMS].clients == 1  # headers come after the subscription
        started = time.monotonic()
        await runner.cleanup()
        env.runners.remove(runner)
        with pytest.raises((EOFError, aiohttp.ClientError)):
            await next_event(resp)
    assert time.monotonic() - started < 3


# --- proxy --------------------------------------------------------------------------------


async def test_proxy_forwards_http(env, upstream):
    env.backend.targets[INSTANCE] = ("demo/viz", upstream["url"])
    headers = {"X-Custom": "1", "Connection": "keep-alive, X-Drop", "X-Drop": "secret"}
    target = URL(f"{env.url}{PREFIX}/static/a%20b.js?x=1&y=%2F%3D", encoded=True)
    async with env.http.get(target, headers=headers) as r:
        assert r.status == 200
        assert r.headers["X-Upstream"] == "yes" and r.headers["Set-Cookie"].startswith("sid=1")
        got = await r.json()
    assert got["raw_path"] == f"{PREFIX}/static/a%20b.js?x=1&y=%2F%3D"  # byte for byte
    assert got["headers"]["X-Custom"] == "1" and "X-Drop" not in got["headers"]
    assert got["headers"]["Host"] == env.url.removeprefix("http://")
    assert got["headers"]["X-Forwarded-For"] == "127.0.0.1"

    payload = bytes(range(256)) * 1024  # 256 KiB, streamed both ways
    async with env.http.post(f"{env.url}{PREFIX}/upload", data=payload) as r:
        got = await r.json()
    assert (got["method"], got["body_len"]) == ("POST", len(payload))

    async with env.http.get(f"{env.url}{PREFIX}/teapot") as r:
        assert (r.status, await r.text()) == (418, "short and stout")
    async with env.http.get(f"{env.url}{PREFIX}/moved", allow_redirects=False) as r:
        assert r.status == 302 and r.headers["Location"] == f"{PREFIX}/elsewhere"


async def test_proxy_refuses_unknown_or_mismatched_instances(env, upstream):
    env.backend.targets[INSTANCE] = ("other/app", upstream["url"])
    for path in (
        f"{PREFIX}/",
        "/apps/demo/viz/i-doesnotexist00/",
        "/apps/demo/viz/../x/",
        "/apps/demo/viz/NOTANID/",
    ):
        async with env.http.get(env.url + path) as r:
            assert r.status == 404, path
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    env.backend.targets[INSTANCE] = ("demo/viz", dead)
    async with env.http.get(f"{env.url}{PREFIX}/") as r:
        assert r.status == 502 and (await r.json())["error"]["code"] == "unavailable"


async def test_proxy_relays_websockets_both_ways(env, upstream):
    env.backend.targets[INSTANCE] = ("demo/viz", upstream["url"])
    async with env.http.ws_connect(f"{env.url}{PREFIX}/ws", protocols=("bokeh",)) as ws:
        assert ws.protocol == "bokeh"
        await ws.send_str("hi")
        assert (await ws.receive(timeout=5)).data == "echo:hi"
        await ws.send_bytes(b"\x01\x02\x03")
        assert (await ws.receive(timeout=5)).data == b"\x03\x02\x01"
        await ws.send_str("bye")  # the app closes: the browser sees its close code
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4000
    await asyncio.wait_for(upstream["ws_closed"].wait(), 5)

    upstream["ws_closed"].clear()
    async with env.http.ws_connect(f"{env.url}{PREFIX}/ws") as ws:
        await ws.send_str("x")
        assert (await ws.receive(timeout=5)).data == "echo:x"
    # The browser closed: the app's side is closed too.
    await asyncio.wait_for(upstream["ws_closed"].wait(), 5)


async def test_app_root_redirects_to_the_ready_shared_instance(env):
    url = f"{env.url}/apps/demo/viz/"
    async with env.http.get(url, allow_redirects=False) as r:
        assert r.status == 404
    dep = Deployment(
        app="demo/viz",
        slot=SHARED,
        instance=INSTANCE,
        state=AppState.READY,
        url=f"http://gw{PREFIX}/",
        event_id="ev-1",
        created_at=1.0,
        last_page_load=1.0,
    )
    await env.state.deployments.put(slot_key("demo/viz", SHARED), dep)
    async with env.http.get(url, allow_redirects=False) as r:
        assert r.status == 302 and r.headers["Location"] == dep.url


# --- static, health, metrics --------------------------------------------------------------


async def test_embed_js_demo_and_root(env):
    async with env.http.get(f"{env.url}/embed.js") as r:
        assert r.status == 200 and r.content_type == "text/javascript"
        text = await r.text()
    assert "data-spinyard-app" in text and "EventSource" in text and "watchJob" in text
    async with env.http.get(f"{env.url}/demo") as r:
        assert r.status == 200 and r.content_type == "text/html"
        assert '<script src="/embed.js">' in await r.text()
    async with env.http.get(f"{env.url}/", allow_redirects=False) as r:
        assert r.status == 302 and r.headers["Location"] == "/demo"


async def test_cors_preflight_and_unknown_api_route(env):
    headers = {
        "Origin": "https://site.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    async with env.http.options(f"{env.url}/v1/events", headers=headers) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
    async with env.http.get(f"{env.url}/v1/nothing") as r:
        assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"


async def test_metrics_parse_and_count_up(env):
    before = await env.metrics()
    await env.post(page_load())
    await env.post(page_load(app="demo/nope"))
    after = await env.metrics()

    def delta(name, **labels):
        key = (name, frozenset(labels.items()))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("spinyard_gateway_events_total", type="page_load", outcome="accepted") == 1
    assert delta("spinyard_gateway_events_total", type="page_load", outcome="unknown_app") == 1
    assert delta("spinyard_gateway_requests_total", route="/v1/events", status="202") == 1
    assert delta("spinyard_gateway_requests_total", route="/v1/events", status="404") == 1
    assert delta("spinyard_gateway_requests_total", route="/metrics", status="200") == 1
    assert after[("spinyard_gateway_publish_seconds_count", frozenset())] == 1
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in after.items()
        if name == "spinyard_gateway_publish_seconds_bucket"
    )
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert buckets[-1] == (float("inf"), 1)
    assert after[("spinyard_gateway_sse_clients", frozenset())] == 0
    async with env.http.get(f"{env.url}/metrics") as r:
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert r.headers["Cache-Control"] == "no-store"
