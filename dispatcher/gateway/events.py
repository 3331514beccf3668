"""`POST /v1/events`: what a browser may send, checked, authorized and published.

An event is read within the size limit, decoded (JSON, or msgpack by its
Content-Type), checked to be plain data (`schemas.plain`: no bin, extension
types, lone surrogates or infinities), validated against its model, stamped
with the gateway's clock (a browser's clock says nothing spinyard can use),
authorized by the auth hook, checked against the app it names (exists,
right kind, inputs not too large, a pinned revision kept) and published as msgpack on the
JetStream events stream with its id as the de-duplication id. Every refusal
is a `GatewayError` with the public error body; nothing refused is published.
"""

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from aiohttp import web
from pydantic import BaseModel, ValidationError

from dispatcher import logs
from dispatcher.gateway import EVENT, SESSION, GatewayError
from dispatcher.gateway.keys import AUTH, JS, METRICS, SETTINGS, SPECS, STATE
from handlers import revisions
from handlers.errors import PublicError
from schemas import codec, subjects
from schemas import errors as codes
from schemas.answers import Accepted
from schemas.codec import encode
from schemas.events import Heartbeat, PageLoad, RunCancel, RunRequest, job_id_for

log = logs.get("spinyard.gateway")

Auth = Callable[[web.Request, str | None, str | None], Awaitable[None] | None]
"""`auth(request, app, job_id)`: return to allow, raise `GatewayError` (or anything) to reject."""


# What a browser may send, and the app kind each needs.
BROWSER_EVENTS: dict[str, type[BaseModel]] = {
    subjects.PAGE_LOAD: PageLoad,
    subjects.HEARTBEAT: Heartbeat,
    subjects.RUN_REQUEST: RunRequest,
    subjects.RUN_CANCEL: RunCancel,
}
NEEDS_KIND = {subjects.PAGE_LOAD: "viz", subjects.HEARTBEAT: "viz", subjects.RUN_REQUEST: "job"}
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
STATUS_OF_ERROR = {codes.UNAUTHORIZED: 401, codes.FORBIDDEN: 403, codes.TOO_MANY: 429}


def describe(exc: ValidationError) -> str:
    """A validation error as `field: reason; ...`, readable by whoever wrote the request."""
    parts = []
    for err in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


async def authorize(request: web.Request, app: str | None, job_id: str | None) -> None:
    """Run the auth hook, if any. It may read `request[SESSION]` and `request[EVENT]`.

    An exception with an int `status` (4xx), a `code` and a `message` (like `GatewayError`)
    is answered as it says; a `PublicError` by its code; anything else with a plain 401.

    Raises:
        GatewayError: the hook rejected the request.
    """
    hook = request.app[AUTH]
    if hook is None:
        return
    try:
        result = hook(request, app, job_id)
        if inspect.isawaitable(result):
            await result
    except Exception as exc:
        status, code, message = (getattr(exc, a, None) for a in ("status", "code", "message"))
        if isinstance(exc, PublicError):
            status = STATUS_OF_ERROR.get(exc.code, 403)
        if isinstance(status, int) and 400 <= status < 500 and isinstance(code, str):
            raise GatewayError(status, code, str(message or code)) from exc
        log.warning("auth_hook_failed", error=type(exc).__name__)
        raise GatewayError(401, codes.UNAUTHORIZED, "not authorized") from exc


# --- events -------------------------------------------------------------------------------


async def read_body(request: web.Request, limit: int, what: str = "an event body") -> bytes:
    """The request body, refusing to read more than `limit` bytes.

    Raises:
        GatewayError: 413 by Content-Length or once the body read passes `limit`.
    """
    too_large = GatewayError(413, codes.TOO_LARGE, f"{what} may be at most {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    while chunk := await request.content.readany():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def parse_event(body: bytes, content_type: str) -> BaseModel:
    """Decode and validate one browser event, its `time` set to the gateway's clock.

    Raises:
        GatewayError: 400 bad_encoding (not JSON/msgpack, or not plain data, naming where),
            or 422 invalid_event naming the field and reason.
    """
    msgpack_body = content_type in MSGPACK_TYPES
    try:
        obj = codec.loads(body, "application/msgpack" if msgpack_body else "application/json")
    except codec.DecodeError as exc:
        kind = "msgpack" if msgpack_body else "JSON"
        raise GatewayError(400, codes.BAD_ENCODING, f"the body is not valid {kind}") from exc
    try:
        codec.check_plain(obj)
    except codec.NotPlainError as exc:
        raise GatewayError(400, codes.BAD_ENCODING, str(exc)[:300]) from exc
    if not isinstance(obj, dict):
        raise GatewayError(422, codes.INVALID_EVENT, "an event must be an object")
    kind = obj.get("type")
    model = BROWSER_EVENTS.get(kind) if isinstance(kind, str) else None
    if model is None:
        if kind in subjects.KINDS:
            raise GatewayError(
                422, codes.INVALID_EVENT, f"type: {kind!r} events are internal to spinyard"
            )
        allowed = ", ".join(BROWSER_EVENTS)
        raise GatewayError(422, codes.INVALID_EVENT, f"type: must be one of {allowed}")
    try:
        event = model.model_validate(obj)
    except ValidationError as exc:
        raise GatewayError(422, codes.INVALID_EVENT, describe(exc)) from exc
    return event.model_copy(update={"time": time.time()})


async def _check_revision(request: web.Request, app: str, revision: int) -> None:
    """Refuse a run pinned to a revision the app's history does not keep (one KV read, only
    for pinned runs; the handler checks again when it runs, `handlers.rollout`).

    Raises:
        GatewayError: 404 unknown_revision.
    """
    records = request.app[STATE].revisions
    if records is None:  # no history here: the handler answers
        return
    history = await records.get(app)
    if history is None or history.find(revision) is None:
        raise GatewayError(404, codes.UNKNOWN_REVISION, revisions.not_kept(app, revision))


async def post_event(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    kind = "unknown"
    try:
        body = await read_body(request, request.app[SETTINGS].max_body_bytes)
        event: Any = parse_event(body, request.content_type)
        kind = event.type
        request[EVENT], request[SESSION] = event, event.session
        if kind == subjects.RUN_CANCEL:
            await authorize(request, None, event.job_id)
            subject = subjects.event_for(kind, event.job_id)
        else:
            await authorize(request, event.app, None)
            spec = await request.app[SPECS].get(event.app)
            if spec is None:
                raise GatewayError(404, codes.UNKNOWN_APP, f"no app named {event.app!r}")
            if spec.kind != NEEDS_KIND[kind]:
                raise GatewayError(
                    422,
                    codes.WRONG_KIND,
                    f"{kind} needs a {NEEDS_KIND[kind]} app; {event.app!r} is a {spec.kind} app",
                )
            if kind == subjects.RUN_REQUEST:
                size = codec.packed_size(event.inputs)
                if size > spec.max_input_bytes:
                    message = f"inputs: {size} bytes, {event.app!r} takes {spec.max_input_bytes}"
                    raise GatewayError(413, codes.TOO_LARGE, message)
                if event.revision is not None:
                    await _check_revision(request, event.app, event.revision)
                job_id = job_id_for(event.app, event.session, event.idempotency_key, event.id)
                event = event.model_copy(update={"job_id": job_id})
            subject = subjects.event(kind, event.app)
    except GatewayError as exc:
        metrics.count_event(kind, exc.code)
        log.info("event_rejected", type=kind, code=exc.code, status=exc.status)
        raise

    started = time.perf_counter()
    try:
        await request.app[JS].publish(subject, encode(event), headers={"Nats-Msg-Id": event.id})
    except (nats.errors.Error, ConnectionError) as exc:
        metrics.count_event(kind, codes.UNAVAILABLE)
        log.warning("event_publish_failed", type=kind, event_id=event.id, error=type(exc).__name__)
        message = "the event bus is not reachable; try again"
        raise GatewayError(503, codes.UNAVAILABLE, message) from exc
    metrics.observe_publish(time.perf_counter() - started)
    metrics.count_event(kind, "accepted")
    answer = Accepted(id=event.id, time=event.time, job_id=getattr(event, "job_id", None))
    log.info(
        "event_accepted",
        type=kind,
        event_id=event.id,
        app=getattr(event, "app", None),
        job_id=getattr(event, "job_id", None),
    )
    return web.json_response(answer.model_dump(mode="json", exclude_none=True), status=202)
