"""The OpenAPI document at /v1/openapi.json: valid OpenAPI 3.1, every registered route in it,
and its schemas those of the models the gateway validates with."""

import pytest
from aiohttp import web
from openapi_spec_validator import OpenAPIV31SpecValidator

from dispatcher.backends.local.secrets import SecretFiles
from dispatcher.gateway.app import make_app
from dispatcher.gateway.openapi import OPERATIONS, PROXY_METHODS, document
from dispatcher.gateway.security import Guard
from dispatcher.settings import AuthSettings
from tests.gateway.support import page_load


async def fetch(env, url: str | None = None) -> dict:
    async with env.http.get(f"{url or env.url}/v1/openapi.json") as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        return await resp.json()


def registered(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route; a "*" route as each method the document lists for it."""
    out = set()
    for route in app.router.routes():
        path = route.resource.canonical
        if route.method == "HEAD":  # aiohttp's, beside every GET
            assert ("GET", path) in {(r.method, r.resource.canonical) for r in app.router.routes()}
            continue
        methods = PROXY_METHODS if route.method == "*" else (route.method,)
        out |= {(m, path) for m in methods}
    return out


def documented(doc: dict) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in doc["paths"].items() for m in item}


async def test_the_document_is_valid_openapi_31_and_lists_every_route(env):
    doc = await fetch(env)
    assert doc["openapi"] == "3.1.0"
    OpenAPIV31SpecValidator(doc).validate()
    app = env.runners[0]._app
    assert documented(doc) == registered(app)
    assert ("POST", "/v1/events") in documented(doc)


async def test_with_the_guard_its_routes_are_listed_too(env):
    guard = Guard(
        AuthSettings(hs256_secret="s" * 32, dev_token_endpoint=True), env.state, "http://gw"
    )
    runner = await env.start(guard=guard)
    doc = await fetch(env, runner.url)
    OpenAPIV31SpecValidator(doc).validate()
    assert documented(doc) == registered(runner._app)
    assert {("GET", "/embed/{owner}/{title}"), ("GET", "/v1/dev/token")} <= documented(doc)


async def test_every_described_operation_is_a_route_of_some_gateway(env, tmp_path):
    """`OPERATIONS` holds nothing stale: each entry is registered, with or without the guard
    (and a secret store)."""
    guard = Guard(
        AuthSettings(hs256_secret="s" * 32, dev_token_endpoint=True), env.state, "http://gw"
    )
    paths = set()
    for g, secrets in ((None, None), (guard, SecretFiles(tmp_path))):
        app = make_app(
            env.settings.gateway, js=env.js, state=env.state, backend=None, guard=g, secrets=secrets
        )
        paths |= {(r.method, r.resource.canonical) for r in app.router.routes()}
    assert set(OPERATIONS) <= paths


async def test_an_undescribed_route_fails_loudly():
    async def handler(_: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_get("/v1/secret-route", handler)
    with pytest.raises(KeyError, match="/v1/secret-route"):
        document(app)


async def test_events_body_is_the_models_schema_and_errors_the_error_body(env):
    doc = await fetch(env)
    post = doc["paths"]["/v1/events"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert body["discriminator"]["mapping"]["run_request"] == "#/components/schemas/RunRequest"
    schemas = doc["components"]["schemas"]
    run = schemas["RunRequest"]
    assert {"type", "app", "session"} <= set(run["required"])
    assert run["properties"]["session"]["pattern"] == "^[A-Za-z0-9_-]{1,64}$"
    assert "32 levels" in run["properties"]["inputs"]["description"]
    assert set(schemas["ErrorBody"]["required"]) == {"error"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            default = op["responses"].get("default")
            assert default and default["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorBody"
            }, (method, path)
    # The accepted answer is what the gateway sends.
    status, answer = await env.post(page_load())
    assert status == 202
    assert set(answer) <= set(schemas["Accepted"]["properties"])


async def test_the_secrets_routes_take_a_name_pattern_and_answer_names_only(sgw):
    doc = await fetch(sgw)
    OpenAPIV31SpecValidator(doc).validate()
    one = doc["paths"]["/v1/apps/{owner}/{title}/secrets/{name}"]
    assert set(one) == {"put", "delete"}
    [name] = [p for p in one["put"]["parameters"] if p["name"] == "name"]
    assert name["schema"]["pattern"] == "^[A-Za-z_][A-Za-z0-9_]{0,127}$"
    assert one["put"]["security"] == [{"bearer": []}]
    assert {"201", "200", "403", "422"} <= set(one["put"]["responses"])
    listing = doc["paths"]["/v1/apps/{owner}/{title}/secrets"]["get"]["responses"]["200"]
    ref = listing["content"]["application/json"]["schema"]["$ref"]
    names = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert set(names["properties"]) == {"app", "names"}  # never a value
    answer = doc["components"]["schemas"]["SecretSet"]
    assert set(answer["properties"]) == {"app", "name", "created"}
