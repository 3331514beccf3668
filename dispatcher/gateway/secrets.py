"""An app's secrets over HTTP: set, list and remove them with a publisher token.

- `PUT /v1/apps/{owner}/{title}/secrets/{NAME}`: the body is the value, as
  it is (UTF-8, no NUL, not empty, at most `max_body_bytes`). 201 for a new
  secret, 200 for a replaced value, with `{app, name, created}`.
- `GET /v1/apps/{owner}/{title}/secrets`: `{app, names}`, the names only.
- `DELETE /v1/apps/{owner}/{title}/secrets/{NAME}`: 204, or 404 if it is not set.

Each needs a publisher token naming the owner (`Guard.publisher`), as
publishing does; a page's token cannot. The app need not be published yet:
CI sets an app's secrets, then publishes the spec that names them. A NAME
that is not an environment variable's name is a 422 `invalid_secret`. A
gateway built without a store (`make_app(secrets=None)`) has none of these
routes; `spinyard gateway` and `spinyard up` always give it the backend's.

The value goes from the request straight to the store the backend reads
(`dispatcher.backends.secrets.SecretStore`: a 0600 file, or the app's
Secret), never onto NATS or into the KV. Nothing here logs, answers or puts
in an error a value: only the app, the name and the token's subject
(`secret_set`, `secret_removed`); the gateway keeps no access log, and the
store's own errors name the operation, not the data.
"""

from collections.abc import Awaitable
from typing import TypeVar

from aiohttp import web

from dispatcher import logs
from dispatcher.backends.secrets import SecretStore
from dispatcher.gateway import GatewayError
from dispatcher.gateway.events import read_body
from dispatcher.gateway.keys import SECRETS, SETTINGS
from dispatcher.gateway.publish import path_app, publisher_of
from handlers.errors import PermanentError, RetryableError
from schemas import errors as codes
from schemas.answers import SecretNames, SecretSet
from schemas.names import check_secret_name

log = logs.get("spinyard.gateway")
T = TypeVar("T")


def _store(request: web.Request) -> SecretStore:
    store = request.app[SECRETS]
    assert store is not None  # the routes are added only with a store
    return store


def _name(request: web.Request) -> str:
    try:
        return check_secret_name(request.match_info["name"])
    except ValueError as exc:
        raise GatewayError(422, codes.INVALID_SECRET, str(exc)) from exc


def _value(body: bytes) -> str:
    """The body as a value: UTF-8 text without NUL (an environment variable's value).

    The messages never quote the body.
    """
    try:
        value = body.decode()
    except UnicodeDecodeError:
        raise GatewayError(422, codes.INVALID_SECRET, "the value is not UTF-8 text") from None
    if not value:
        raise GatewayError(422, codes.INVALID_SECRET, "the value is empty: rm the secret instead")
    if "\0" in value:
        raise GatewayError(422, codes.INVALID_SECRET, "the value holds a NUL character")
    return value


async def _stored(what: str, app: str, call: Awaitable[T]) -> T:
    """The store's answer; its failure as a 503 (logged by kind and code, never by data)."""
    try:
        return await call
    except (PermanentError, RetryableError) as exc:
        log.warning("secret_store_failed", app=app, what=what, code=exc.code, error=str(exc))
        raise GatewayError(503, codes.UNAVAILABLE, "the secret store did not answer") from None


async def put_secret(request: web.Request) -> web.Response:
    app, owner = path_app(request)
    by = publisher_of(request, owner)
    name, store = _name(request), _store(request)
    limit = request.app[SETTINGS].max_body_bytes
    value = _value(await read_body(request, limit, what="a secret's value"))
    created = await _stored("put", app, store.put(app, name, value))
    log.info("secret_set", app=app, name=name, created=created, by=by)
    answer = SecretSet(app=app, name=name, created=created).model_dump(mode="json")
    return web.json_response(answer, status=201 if created else 200)


async def list_secrets(request: web.Request) -> web.Response:
    app, owner = path_app(request)
    publisher_of(request, owner)
    names = await _stored("names", app, _store(request).names(app))
    return web.json_response(SecretNames(app=app, names=names).model_dump(mode="json"))


async def delete_secret(request: web.Request) -> web.Response:
    app, owner = path_app(request)
    by = publisher_of(request, owner)
    name, store = _name(request), _store(request)
    if not await _stored("remove", app, store.remove(app, name)):
        raise GatewayError(404, codes.NOT_FOUND, f"{app} has no secret {name}")
    log.info("secret_removed", app=app, name=name, by=by)
    return web.Response(status=204)


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the secrets routes (a gateway built without a store has none: 404)."""
    router.add_get("/v1/apps/{owner}/{title}/secrets", list_secrets)
    router.add_put("/v1/apps/{owner}/{title}/secrets/{name}", put_secret)
    router.add_delete("/v1/apps/{owner}/{title}/secrets/{name}", delete_secret)
