"""Publishing apps over HTTP: create, update, read, roll back and remove app specs.

- `PUT /v1/apps/{owner}/{title}`: the spec as JSON, or YAML with
  `Content-Type: application/yaml`. Its `name` must be the path's or absent.
  201 for a new app, 200 for an update, each with `{app, revision, digest}`;
  a spec whose digest is the current revision's answers 200 with that
  revision and writes nothing. A spec that does not validate is a 422
  `invalid_spec` naming the field, and nothing is written.
- `GET /v1/apps/{owner}/{title}`: the current spec (presets expanded) and revision.
- `GET /v1/apps/{owner}/{title}/revisions`: the revisions kept (who, when, digest).
- `POST /v1/apps/{owner}/{title}/rollback` `{"revision": N}`: revision N's
  spec becomes current again, as a new revision (404 if N is not kept).
- `DELETE /v1/apps/{owner}/{title}`: removes the app (204). The reaper then
  stops its instances and pool members (reason `app_removed`); its runs'
  results stay until their retention ends, and its history stays, so a later
  publish continues its revision numbers.

Each needs a publisher token naming the owner (`Guard.publisher`), reading
too: a spec may hold environment values. With authentication off, anyone
may publish, as anyone may send events then.

What is kept (`handlers.revisions`): each revision holds the spec as
submitted (with `name` filled in), and its digest is over that, so the same
file always gives the same digest; the apps bucket holds the validated spec
with `framework` presets expanded, which is what handlers run. The history
is written first (compare-and-set, so concurrent publishes each get their own
number), then the current spec, until the apps bucket holds the spec the
history says is current (`converge`), stamped with its revision number
(`AppSpec.revision`), which instances, pool members and runs then record
(`handlers.rollout`: older instances drain, new viewers get the new one). A
submitted spec may not set `revision` itself. Each change is logged (`app_published`,
`app_removed`: app, revision, digest, the token's subject; never the spec).
"""

import json
import time
from typing import Any

import yaml
from aiohttp import web
from pydantic import ValidationError

from dispatcher import logs
from dispatcher.gateway import GatewayError
from dispatcher.gateway.auth import AuthError
from dispatcher.gateway.events import describe, read_body
from dispatcher.gateway.keys import AUTH, GUARD, SETTINGS, STATE
from handlers import revisions
from handlers.revisions import History
from handlers.state import Records, State
from schemas import errors as codes
from schemas.answers import AppRevision, Published, PublishedSpec, RevisionList, Rollback
from schemas.names import check_app
from schemas.spec import AppSpec

log = logs.get("spinyard.gateway")

CONVERGE_TRIES = 20  # writes of the apps bucket before a change that keeps racing gives up
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


def path_app(request: web.Request) -> tuple[str, str]:
    """The app name and owner of the path, or a 404."""
    owner, title = request.match_info["owner"], request.match_info["title"]
    try:
        return check_app(f"{owner}/{title}"), owner
    except ValueError as exc:
        raise GatewayError(404, codes.UNKNOWN_APP, str(exc)) from exc


def publisher_of(request: web.Request, owner: str) -> str | None:
    """The publisher's subject, after checking their token may publish `owner`'s apps."""
    guard = request.app[GUARD]
    if guard is None:
        if request.app[AUTH] is not None:  # a custom hook knows no publisher tokens: refuse
            raise GatewayError(403, codes.FORBIDDEN, "publishing is not enabled on this gateway")
        return None
    try:
        return guard.publisher(request, owner)
    except AuthError as exc:
        raise GatewayError(exc.status, exc.code, exc.message) from exc


def _history_records(request: web.Request) -> Records[History]:
    records = request.app[STATE].revisions
    if records is None:  # a State built without the revisions bucket
        raise GatewayError(503, codes.UNAVAILABLE, "app revisions are not available here")
    return records


def parse_spec(body: bytes, content_type: str, name: str) -> tuple[dict[str, Any], AppSpec]:
    """The submitted spec (with `name` filled in) and its validated form.

    Raises:
        GatewayError: 400 if the body is not JSON/YAML, 422 if not a valid spec for `name`.
    """
    try:
        if content_type in YAML_TYPES:
            raw = yaml.safe_load(body.decode())
        else:
            raw = json.loads(body)
    except (UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        kind = "YAML" if content_type in YAML_TYPES else "JSON"
        raise GatewayError(400, codes.BAD_ENCODING, f"the body is not {kind}: {exc}") from exc
    if not isinstance(raw, dict):
        raise GatewayError(422, codes.INVALID_SPEC, "an app spec must be a mapping")
    if "revision" in raw:
        message = "revision: set by publishing (each change answers the revision it made); omit it"
        raise GatewayError(422, codes.INVALID_SPEC, message)
    if raw.setdefault("name", name) != name:
        message = f"name: {raw['name']!r} is not the app of this path ({name!r}); omit it or match"
        raise GatewayError(422, codes.INVALID_SPEC, message)
    try:
        spec = AppSpec.model_validate(raw)
    except ValidationError as exc:
        raise GatewayError(422, codes.INVALID_SPEC, describe(exc)) from exc
    try:
        json.dumps(raw, allow_nan=False)  # YAML may hold dates, sets: not storable as given
    except (TypeError, ValueError) as exc:
        raise GatewayError(422, codes.INVALID_SPEC, f"the spec is not plain data: {exc}") from exc
    return raw, spec


async def converge(
    state: State, records: Records[History], name: str, spec: AppSpec | None, revision: int
) -> None:
    """Write `spec` (None: remove the app) as current, then make sure it is the history's.

    Concurrent changes of one app each take their revision in the history
    (compare-and-set), then write the apps bucket, and the write that lands last
    may be an older revision's. So after each write the history is read again,
    and while another revision is current its spec is written instead: the apps
    bucket ends as the history says, whoever finishes last.
    """
    for _ in range(CONVERGE_TRIES):
        if spec is None:
            await state.apps.delete(name)
        else:  # stamped, so handlers know the current revision (`handlers.rollout`)
            await state.apps.put(name, spec.model_copy(update={"revision": revision}))
        history = await records.get(name)
        current = history.current_revision() if history else None
        if (current.revision if current else 0) == revision:
            return
        revision = current.revision if current else 0
        spec = AppSpec.model_validate(current.spec) if current else None
    raise GatewayError(503, codes.UNAVAILABLE, f"{name} kept changing; try again")


async def _publish(
    request: web.Request, name: str, raw: dict[str, Any], spec: AppSpec, by: str | None
) -> web.Response:
    """Record `raw` as the app's next revision and make `spec` current (see module doc)."""
    state, keep = request.app[STATE], request.app[SETTINGS].revisions_kept
    existed = await state.apps.get(name) is not None
    now = time.time()

    def change(history: History) -> History | None:
        if not existed:  # removed outside this API (`spinyard apps rm` over NATS)
            history = revisions.removed(history) or history
        return revisions.publish(history, raw, by=by, at=now, keep=keep)

    records = _history_records(request)
    written = await records.change(name, change, default=History)
    if written is None:  # the same spec is current: nothing to write
        current = (await records.get(name) or History()).current_revision()
        assert current is not None  # `publish` declines only when one is current
        return _answer(name, current.revision, current.digest, 200, changed=False)
    new = written.value.current_revision()
    assert new is not None
    await converge(state, records, name, spec, new.revision)
    # Who changed what: never the spec itself (it may hold environment values).
    log.info("app_published", app=name, revision=new.revision, digest=new.digest, by=by)
    return _answer(name, new.revision, new.digest, 200 if existed else 201)


def _answer(
    name: str, revision: int, digest: str, status: int, *, changed: bool = True
) -> web.Response:
    answer = Published(name=name, app=name, revision=revision, digest=digest, changed=changed)
    body = answer.model_dump(mode="json")
    return web.json_response(body, status=status)


async def put_app(request: web.Request) -> web.Response:
    name, owner = path_app(request)
    by = publisher_of(request, owner)
    limit = request.app[SETTINGS].max_body_bytes
    body = await read_body(request, limit, what="an app spec")
    raw, spec = parse_spec(body, request.content_type, name)
    return await _publish(request, name, raw, spec, by)


async def get_app(request: web.Request) -> web.Response:
    name, owner = path_app(request)
    publisher_of(request, owner)
    spec = await request.app[STATE].apps.get(name)
    if spec is None:
        raise GatewayError(404, codes.UNKNOWN_APP, f"no app named {name!r}")
    history = await _history_records(request).get(name)
    current = history.current_revision() if history else None
    body = PublishedSpec(
        app=name,
        revision=current.revision if current else None,
        digest=current.digest if current else None,
        spec=spec.model_dump(mode="json", exclude={"revision"}),  # it is `revision` above
    )
    return web.json_response(body.model_dump(mode="json"))


async def list_revisions(request: web.Request) -> web.Response:
    name, owner = path_app(request)
    publisher_of(request, owner)
    history = await _history_records(request).get(name)
    if history is None:
        raise GatewayError(404, codes.UNKNOWN_APP, f"no app named {name!r} was published here")
    entries = [AppRevision.model_validate(r, from_attributes=True) for r in history.revisions]
    body = RevisionList(app=name, current=history.current, revisions=entries)
    return web.json_response(body.model_dump(mode="json"))


async def rollback(request: web.Request) -> web.Response:
    name, owner = path_app(request)
    by = publisher_of(request, owner)
    body = await read_body(request, request.app[SETTINGS].max_body_bytes, what="a rollback body")
    try:
        wanted = Rollback.model_validate_json(body).revision
    except ValidationError as exc:
        raise GatewayError(422, codes.INVALID_SPEC, describe(exc)) from exc
    history = await _history_records(request).get(name)
    earlier = history.find(wanted) if history else None
    if earlier is None:
        raise GatewayError(404, codes.NOT_FOUND, f"{name} has no revision {wanted} (kept or not)")
    try:
        spec = AppSpec.model_validate(earlier.spec)
    except ValidationError as exc:  # valid when published, not under today's rules
        message = f"revision {wanted} is no longer a valid spec: {describe(exc)}"
        raise GatewayError(422, codes.INVALID_SPEC, message) from exc
    return await _publish(request, name, earlier.spec, spec, by)


async def delete_app(request: web.Request) -> web.Response:
    name, owner = path_app(request)
    by = publisher_of(request, owner)
    if await request.app[STATE].apps.get(name) is None:
        raise GatewayError(404, codes.UNKNOWN_APP, f"no app named {name!r}")
    records = _history_records(request)
    await records.change(name, revisions.removed)
    await converge(request.app[STATE], records, name, None, 0)
    log.info("app_removed", app=name, by=by)
    return web.Response(status=204)


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the publishing routes (`GET /v1/apps`, the list, is the app module's)."""
    router.add_put("/v1/apps/{owner}/{title}", put_app)
    router.add_get("/v1/apps/{owner}/{title}", get_app)
    router.add_delete("/v1/apps/{owner}/{title}", delete_app)
    router.add_get("/v1/apps/{owner}/{title}/revisions", list_revisions)
    router.add_post("/v1/apps/{owner}/{title}/rollback", rollback)
