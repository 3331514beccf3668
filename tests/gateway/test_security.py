"""The gateway with authentication on: tokens, sessions, origins, frame-ancestors, dev tokens."""

import time

import pytest

from dispatcher.gateway.auth import mint
from dispatcher.gateway.security import Guard
from dispatcher.settings import AuthSettings
from handlers.jobs import Job
from schemas.spec import AppSpec
from schemas.status import JobState
from tests.gateway.support import INSTANCE, PREFIX

SECRET = "t" * 40
FRAMED = AppSpec(
    name="demo/framed", command=["x"], embed_origins=["https://site.example", "'self'"]
)


@pytest.fixture
async def secured(env):
    """A second gateway on the same bus, with authentication on."""
    await env.state.apps.put(FRAMED.name, FRAMED)
    guard = Guard(AuthSettings(hs256_secret=SECRET), env.state, "http://gateway.test")
    env.url = (await env.start(guard=guard)).url
    return env


async def queued_run(env, job_id: str, session: str | None = None) -> Job:
    """A run of demo/job recorded as queued, as run_request would leave it."""
    job = Job(
        job_id=job_id,
        app="demo/job",
        session=session,
        state=JobState.QUEUED,
        event_id="e",
        deadline_s=60,
        retention_s=60,
        created_at=time.time(),
    )
    await env.state.jobs.put(job.job_id, job)
    return job


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def page_load(app="demo/viz", session="s-1") -> dict:
    return {"type": "page_load", "app": app, "session": session}


@pytest.mark.parametrize(
    ("token", "status", "code"),
    [
        (None, 401, "unauthorized"),
        ("garbage", 401, "unauthorized"),
        (mint(SECRET, ["demo/viz"], ttl_s=-30), 401, "unauthorized"),  # expired
        (mint("f" * 40, ["demo/viz"]), 401, "unauthorized"),  # forged
        (mint(SECRET, ["demo/other"]), 403, "forbidden"),  # another app
        (mint(SECRET, ["demo/viz"], session="s-2"), 403, "forbidden"),  # another session
    ],
    ids=["missing", "garbage", "expired", "forged", "other-app", "other-session"],
)
async def test_bad_tokens_are_refused_and_nothing_is_published(secured, token, status, code):
    headers = bearer(token) if token else {}
    got, body = await secured.post(page_load(), headers=headers)
    assert (got, body["error"]["code"]) == (status, code)
    assert body["error"]["message"]
    assert await secured.events_published() == 0


async def test_good_tokens_are_accepted(secured):
    for token in (
        mint(SECRET, ["demo/viz"], session="s-1"),
        mint(SECRET, ["demo/*"]),
        mint(SECRET, ["*"]),
    ):
        got, body = await secured.post(page_load(), headers=bearer(token))
        assert got == 202, body
    assert await secured.events_published() == 3


async def test_status_needs_a_token_for_that_app(secured):
    url = f"{secured.url}/v1/apps/demo/viz/status"
    async with secured.http.get(url) as r:
        assert r.status == 401
    async with secured.http.get(url, headers=bearer(mint(SECRET, ["demo/other"]))) as r:
        assert r.status == 403
    token = mint(SECRET, ["demo/viz"])
    async with secured.http.get(url, params={"token": token}) as r:
        assert r.status == 404  # allowed; there is just no status yet
        assert (await r.json())["error"]["code"] == "not_found"


async def test_job_status_is_authorized_by_the_runs_app(secured):
    job = await queued_run(secured, "j-abcdef0123456789")
    url = f"{secured.url}/v1/jobs/{job.job_id}/status"
    async with secured.http.get(url, headers=bearer(mint(SECRET, ["demo/viz"]))) as r:
        assert r.status == 403
    async with secured.http.get(url, headers=bearer(mint(SECRET, ["demo/job"]))) as r:
        assert r.status == 404  # allowed; no status published in this test
    async with secured.http.get(
        f"{secured.url}/v1/jobs/j-0000000000000000/status", headers=bearer(mint(SECRET, ["*"]))
    ) as r:
        assert r.status == 404


async def test_cancel_needs_a_token_for_the_runs_app(secured):
    job = await queued_run(secured, "j-abcdef0123456780")
    cancel = {"type": "run_cancel", "job_id": job.job_id}
    got, _ = await secured.post(cancel, headers=bearer(mint(SECRET, ["demo/viz"])))
    assert got == 403
    got, _ = await secured.post(cancel, headers=bearer(mint(SECRET, ["demo/job"])))
    assert got == 202


async def test_events_from_unlisted_origins_are_refused(secured):
    token = mint(SECRET, ["*"])
    got, body = await secured.post(
        page_load("demo/framed"), headers=bearer(token) | {"Origin": "https://evil.example"}
    )
    assert (got, body["error"]["code"]) == (403, "forbidden")
    for origin in ("https://site.example", "http://gateway.test"):  # listed, and 'self'
        got, _ = await secured.post(
            page_load("demo/framed"), headers=bearer(token) | {"Origin": origin}
        )
        assert got == 202
    # An app with no embed_origins may be embedded by the gateway's own pages only.
    got, _ = await secured.post(
        page_load(), headers=bearer(token) | {"Origin": "https://site.example"}
    )
    assert got == 403
    assert await secured.events_published() == 2


async def test_proxied_app_and_embed_page_carry_frame_ancestors(secured, upstream):
    secured.backend.targets[INSTANCE] = ("demo/viz", upstream["url"])
    async with secured.http.get(f"{secured.url}{PREFIX}/page") as r:
        assert r.status == 200
        assert r.headers["Content-Security-Policy"] == "frame-ancestors 'self'"
    async with secured.http.get(f"{secured.url}/embed/demo/framed", params={"token": "abc"}) as r:
        assert r.status == 200
        assert r.headers["Content-Security-Policy"] == "frame-ancestors https://site.example 'self'"
        page = await r.text()
        assert 'data-spinyard-app="demo/framed"' in page and 'data-token="abc"' in page
    async with secured.http.get(f"{secured.url}/embed/demo/nothing") as r:
        assert r.status == 404


async def test_dev_token_endpoint_is_off_unless_enabled(secured):
    async with secured.http.get(f"{secured.url}/v1/dev/token") as r:
        assert r.status == 404
    guard = Guard(
        AuthSettings(hs256_secret=SECRET, dev_token_endpoint=True),
        secured.state,
        "http://gateway.test",
    )
    url = (await secured.start(guard=guard)).url
    async with secured.http.get(
        f"{url}/v1/dev/token", params={"app": "demo/viz", "session": "s-9"}
    ) as r:
        token = (await r.json())["token"]
    got, _ = await secured.post(page_load(session="s-9"), url=url, headers=bearer(token))
    assert got == 202
    got, _ = await secured.post(page_load(session="s-1"), url=url, headers=bearer(token))
    assert got == 403


async def test_repeated_idempotency_key_gives_the_same_job_id(secured):
    token = mint(SECRET, ["demo/job"])
    run = {
        "type": "run_request",
        "app": "demo/job",
        "session": "s-1",
        "inputs": {},
        "idempotency_key": "k1",
    }
    _, first = await secured.post(run, headers=bearer(token))
    _, again = await secured.post(run, headers=bearer(token))
    _, other = await secured.post(run | {"idempotency_key": "k2"}, headers=bearer(token))
    assert first["job_id"] == again["job_id"] != other["job_id"]


async def test_unknown_runs_are_not_revealed_without_a_token(secured):
    async with secured.http.get(f"{secured.url}/v1/jobs/j-0000000000000000/status") as r:
        assert r.status == 401  # not 404: no token, no information


async def test_a_session_bound_token_sees_only_its_own_runs(secured):
    job = await queued_run(secured, "j-abcdef0123456781", session="s-1")
    url = f"{secured.url}/v1/jobs/{job.job_id}"
    async with secured.http.get(
        url, headers=bearer(mint(SECRET, ["demo/job"], session="s-2"))
    ) as r:
        assert r.status == 403
    async with secured.http.get(
        url, headers=bearer(mint(SECRET, ["demo/job"], session="s-1"))
    ) as r:
        assert r.status == 404  # allowed; no status published in this test
    cancel = {"type": "run_cancel", "job_id": job.job_id}
    got, _ = await secured.post(cancel, headers=bearer(mint(SECRET, ["demo/job"], session="s-2")))
    assert got == 403


async def test_embed_page_passes_the_session_and_sends_no_referrer(secured):
    async with secured.http.get(
        f"{secured.url}/embed/demo/framed", params={"token": "abc", "session": "s-5"}
    ) as r:
        assert r.headers["Referrer-Policy"] == "no-referrer"
        assert 'data-session="s-5"' in await r.text()
    async with secured.http.get(
        f"{secured.url}/embed/demo/framed", params={"session": "bad id"}
    ) as r:
        assert r.status == 404


async def test_shared_app_redirect_needs_a_token(secured):
    async with secured.http.get(f"{secured.url}/apps/demo/viz/", allow_redirects=False) as r:
        assert r.status == 401


def test_app_csp_is_kept_and_frame_ancestors_is_ours():
    from dispatcher.gateway.proxy import merge_csp

    merged = merge_csp(
        ["default-src 'self'; frame-ancestors *", "img-src data:"], "frame-ancestors 'self'"
    )
    assert merged == "default-src 'self'; img-src data:; frame-ancestors 'self'"
    assert merge_csp([], "frame-ancestors 'none'") == "frame-ancestors 'none'"
