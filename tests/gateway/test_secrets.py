"""An app's secrets over HTTP: set, replace, list (names only), remove; page tokens, other
owners and bad names or values change nothing; values never reach a log or an answer. A
real nats-server behind the gateway, the local backend's 0600 files as the store."""

import pytest
from structlog.testing import capture_logs

from dispatcher.gateway.auth import mint
from handlers.errors import RetryableError
from tests.gateway.support import PUBLISH_SECRET as SECRET

APP = "alice/model"
URL = f"/v1/apps/{APP}/secrets"
VALUE = "s3cr3t-v4lue ✓ {not a placeholder}"


def token(*, publish: tuple[str, ...] = ("alice",), apps: tuple[str, ...] = ()) -> dict:
    minted = mint(SECRET, list(apps), publish=list(publish), subject="ci", ttl_s=300)
    return {"Authorization": f"Bearer {minted}"}


async def call(env, method: str, path: str, headers: dict | None = None, **kwargs):
    async with env.http.request(method, env.url + path, headers=headers, **kwargs) as resp:
        body = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, body, await resp.read()


async def test_set_replace_list_and_remove(sgw):
    auth = token()
    with capture_logs() as logs:
        status, body, _ = await call(sgw, "PUT", f"{URL}/DB_URL", auth, data=VALUE.encode())
        assert (status, body) == (201, {"app": APP, "name": "DB_URL", "created": True})
        status, body, _ = await call(sgw, "PUT", f"{URL}/DB_URL", auth, data=b"v2")
        assert (status, body["created"]) == (200, False)
        status, body, raw = await call(sgw, "PUT", f"{URL}/API_KEY", auth, data=VALUE.encode())
        assert status == 201 and VALUE.encode() not in raw

        status, body, raw = await call(sgw, "GET", URL, auth)
        assert (status, body) == (200, {"app": APP, "names": ["API_KEY", "DB_URL"]})
        assert VALUE.encode() not in raw and b"v2" not in raw
        assert sgw.secrets.read(APP) == {"API_KEY": VALUE, "DB_URL": "v2"}

        status, _, raw = await call(sgw, "DELETE", f"{URL}/DB_URL", auth)
        assert (status, raw) == (204, b"")
        status, body, _ = await call(sgw, "DELETE", f"{URL}/DB_URL", auth)
        assert (status, body["error"]["code"]) == (404, "not_found")
        assert "DB_URL" in body["error"]["message"]
        assert (await call(sgw, "GET", URL, auth))[1]["names"] == ["API_KEY"]
    events = [e["event"] for e in logs]
    assert events.count("secret_set") == 3 and events.count("secret_removed") == 1
    assert {e["name"] for e in logs if e["event"] == "secret_set"} == {"DB_URL", "API_KEY"}
    assert all(e.get("by") == "ci" for e in logs if e["event"].startswith("secret_"))
    assert VALUE not in repr(logs) and "v2" not in repr(logs)


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "unauthorized"),
        ("page", 403, "forbidden"),  # a page's token: apps, no `publish`
        ("bob", 403, "forbidden"),  # a publisher of another owner
    ],
)
async def test_only_a_publisher_of_the_owner_may_touch_its_secrets(sgw, headers, status, code):
    await sgw.secrets.put(APP, "DB_URL", VALUE)
    if headers == "page":
        headers = token(publish=(), apps=("alice/*",))
    elif headers == "bob":
        headers = token(publish=("bob",))
    for method, path, data in (
        ("PUT", f"{URL}/DB_URL", b"changed"),
        ("PUT", f"{URL}/NEW", b"new"),
        ("GET", URL, None),
        ("DELETE", f"{URL}/DB_URL", None),
    ):
        got, body, raw = await call(sgw, method, path, headers, data=data)
        assert (got, body["error"]["code"]) == (status, code), (method, path)
        assert VALUE.encode() not in raw and b"DB_URL" not in raw
    assert sgw.secrets.read(APP) == {"DB_URL": VALUE}


@pytest.mark.parametrize(
    "name", ["db-url", "1DB", "DB.URL", "SPINYARD_NATS__PASSWORD", "spinyard_x", "A" * 129]
)
async def test_a_name_that_is_not_an_environment_variable_is_a_422_naming_it(sgw, name):
    for method in ("PUT", "DELETE"):
        status, body, _ = await call(sgw, method, f"{URL}/{name}", token(), data=b"v")
        assert (status, body["error"]["code"]) == (422, "invalid_secret")
        assert "secret name" in body["error"]["message"]
    assert await sgw.secrets.names(APP) == []


@pytest.mark.parametrize(
    ("data", "what"),
    [(b"", "empty"), (b"\xff\xfe", "UTF-8"), (b"a\x00b", "NUL")],
)
async def test_a_bad_value_is_a_422_that_does_not_quote_it(sgw, data, what):
    status, body, _ = await call(sgw, "PUT", f"{URL}/DB_URL", token(), data=data)
    assert (status, body["error"]["code"]) == (422, "invalid_secret")
    assert what in body["error"]["message"]
    assert "\\x" not in body["error"]["message"] and "a\x00b" not in body["error"]["message"]
    assert await sgw.secrets.names(APP) == []


async def test_a_value_over_the_body_limit_is_refused(sgw):
    big = b"x" * (sgw.settings.gateway.max_body_bytes + 1)
    status, body, _ = await call(sgw, "PUT", f"{URL}/DB_URL", token(), data=big)
    assert (status, body["error"]["code"]) == (413, "too_large")
    assert await sgw.secrets.names(APP) == []


async def test_a_gateway_without_a_store_has_no_secrets_routes(gw):
    status, body, _ = await call(gw, "PUT", f"{URL}/DB_URL", token(), data=b"v")
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, body, _ = await call(gw, "GET", URL, token())
    assert status == 404


async def test_a_store_that_fails_is_a_503_naming_no_value(sgw, monkeypatch):
    async def refuse(*_):
        raise RetryableError("the Kubernetes API did not patch secrets after 4 tries: 503")

    monkeypatch.setattr(sgw.secrets, "put", refuse)
    with capture_logs() as logs:
        status, body, _ = await call(sgw, "PUT", f"{URL}/DB_URL", token(), data=VALUE.encode())
    assert (status, body["error"]["code"]) == (503, "unavailable")
    assert [e["event"] for e in logs] == ["secret_store_failed"] and VALUE not in repr(logs)
