"""The gateway's routes and wiring: pages publish events and read status here.

It validates what a browser sends (`POST /v1/events`) and publishes it as
msgpack on the JetStream events stream, lists the apps in the KV, and wires
in status (`sse`), the app proxy (`proxy`), `embed.js`, the demo page,
`/healthz` and `/metrics`. It uses the NATS connection its caller owns and
never opens one itself.
"""

import asyncio
import inspect
import re
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats.errors
from aiohttp import web
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ValidationError

from dispatcher import logs
from dispatcher.gateway import EVENT, SESSION, GatewayError, Metrics, error_response
from dispatcher.gateway.proxy import Proxy
from dispatcher.gateway.security import Guard, install
from dispatcher.gateway.sse import StatusStreams
from dispatcher.metrics import exposition
from dispatcher.settings import GatewaySettings
from handlers.errors import PublicError
from handlers.ports import Backend
from handlers.state import State
from schemas import codec, subjects
from schemas import errors as codes
from schemas.codec import encode
from schemas.events import Heartbeat, PageLoad, RunCancel, RunRequest, job_id_for
from schemas.names import JOB_ID_RE

log = logs.get("spinyard.gateway")

STATIC = Path(__file__).parent / "static"

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
# The id becomes the Nats-Msg-Id header: no spaces, no line breaks.
EVENT_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,80}$")
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
STATUS_OF_ERROR = {codes.UNAUTHORIZED: 401, codes.FORBIDDEN: 403, codes.TOO_MANY: 429}


SETTINGS = web.AppKey("settings", GatewaySettings)
JS = web.AppKey("js", JetStreamContext)
NC = web.AppKey("nc", Client)
STATE = web.AppKey("state", State)
BACKEND = web.AppKey("backend", Backend | None)  # type: ignore[arg-type]
AUTH = web.AppKey("auth", Callable | None)  # type: ignore[arg-type]
METRICS = web.AppKey("metrics", Metrics)
STREAMS = web.AppKey("streams", StatusStreams)
PROXY = web.AppKey("proxy", Proxy)


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


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refusing to read more than `limit` bytes.

    Raises:
        GatewayError: 413 by Content-Length or once the body read passes `limit`.
    """
    too_large = GatewayError(413, codes.TOO_LARGE, f"an event body may be at most {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    body = bytearray()
    while chunk := await request.content.readany():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def parse_event(body: bytes, content_type: str) -> BaseModel:
    """Decode and validate one browser event.

    Raises:
        GatewayError: 400 bad_encoding, or 422 invalid_event naming the field and reason.
    """
    msgpack_body = content_type in MSGPACK_TYPES
    try:
        obj = codec.loads(body, "application/msgpack" if msgpack_body else "application/json")
    except codec.DecodeError as exc:
        kind = "msgpack" if msgpack_body else "JSON"
        raise GatewayError(400, codes.BAD_ENCODING, f"the body is not valid {kind}") from exc
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
    if not EVENT_ID_RE.match(event.id):  # type: ignore[attr-defined]
        raise GatewayError(
            422, codes.INVALID_EVENT, "id: 1-80 characters of letters, digits, '_', '.', ':' or '-'"
        )
    return event


async def post_event(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    kind = "unknown"
    try:
        body = await read_body(request, request.app[SETTINGS].max_body_bytes)
        event: Any = parse_event(body, request.content_type)
        kind = event.type
        request[EVENT], request[SESSION] = event, event.session
        if kind == subjects.RUN_CANCEL:
            if not JOB_ID_RE.match(event.job_id):
                message = "job_id: must look like j-<8-40 a-z0-9>"
                raise GatewayError(422, codes.INVALID_EVENT, message)
            await authorize(request, None, event.job_id)
            subject = subjects.event_for(kind, event.job_id)
        else:
            await authorize(request, event.app, None)
            spec = await request.app[STATE].apps.get(event.app)
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
    answer = {"id": event.id, "time": time.time()}
    if kind == subjects.RUN_REQUEST:
        answer["job_id"] = event.job_id
    log.info(
        "event_accepted",
        type=kind,
        event_id=event.id,
        app=getattr(event, "app", None),
        job_id=getattr(event, "job_id", None),
    )
    return web.json_response(answer, status=202)


# --- apps --------------------------------------------------------------------------------


async def list_apps(request: web.Request) -> web.Response:
    specs = sorted((e.value for e in await request.app[STATE].apps.scan()), key=lambda s: s.name)
    return web.json_response(
        [
            {
                "name": s.name,
                "kind": s.kind,
                "sharing": s.sharing,
                "pool": {"size": s.pool.size},
                "description": s.description,
                **({"example_inputs": s.example_inputs} if s.kind == "job" else {}),
            }
            for s in specs
        ]
    )


# --- service routes -----------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    connected = request.app[NC].is_connected
    return web.json_response({"ok": connected, "nats": connected}, status=200 if connected else 503)


async def metrics(request: web.Request) -> web.Response:
    body, content_type = exposition(request.app[METRICS].registry)
    return web.Response(
        body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"}
    )


def static_file(name: str, content_type: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    body = (STATIC / name).read_bytes()

    async def serve(_: web.Request) -> web.Response:
        return web.Response(
            body=body,
            content_type=content_type,
            charset="utf-8",
            headers={"Cache-Control": "public, max-age=300"},
        )

    return serve


async def root(_: web.Request) -> web.Response:
    raise web.HTTPFound("/demo")


def preflight() -> web.Response:
    """The CORS preflight answer for any API path: pages elsewhere send JSON and a token."""
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, Last-Event-ID",
            "Access-Control-Max-Age": "600",
        },
    )


# --- wiring -------------------------------------------------------------------------------


def route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def errors_and_metrics(request: web.Request, handler: Any) -> web.StreamResponse:
    """Error bodies for every failure, and one request count per answer."""
    status = 500
    try:
        if request.method == "OPTIONS" and request.path.startswith("/v1/"):
            response = preflight()
        else:
            response = await handler(request)
        status = response.status
        return response
    except GatewayError as exc:
        status = exc.status
        return error_response(exc.status, exc.code, exc.message)
    except asyncio.CancelledError:
        status = 499  # the client went away (nginx's code for it)
        raise
    except web.HTTPException as exc:
        status = exc.status
        if exc.status < 400 or not request.path.startswith("/v1/"):
            raise
        code = codes.NOT_FOUND if exc.status == 404 else codes.BAD_REQUEST
        return error_response(exc.status, code, exc.reason)
    except nats.errors.Error as exc:  # the KV or a stream did not answer
        status = 503
        log.warning("nats_unavailable", route=route_of(request), error=type(exc).__name__)
        return error_response(503, codes.UNAVAILABLE, "the event bus is not reachable; try again")
    except Exception:
        log.exception("request_failed", route=route_of(request), method=request.method)
        return error_response(500, codes.INTERNAL, "internal error")
    finally:
        request.app[METRICS].count_request(route_of(request), status)


async def cors(request: web.Request, response: web.StreamResponse) -> None:
    """Pages on any origin may call the API: auth is by bearer token, never by cookie."""
    if request.path.startswith("/v1/") or request.path == "/embed.js":
        response.headers["Access-Control-Allow-Origin"] = "*"


def make_app(
    settings: GatewaySettings,
    *,
    js: JetStreamContext,
    state: State,
    backend: Backend | None,
    auth: Auth | None = None,
    nc: Client | None = None,
    guard: Guard | None = None,
    metrics_registry: CollectorRegistry | None = None,
) -> web.Application:
    """The gateway application; the caller owns (and closes) the NATS connection.

    Args:
        settings: listen address, body limit, SSE keep-alive.
        js: JetStream context events are published with and status is read from.
        state: the KV buckets (apps, deployments).
        backend: whose `target()` the app proxy asks; None disables proxying.
        auth: `auth(request, app, job_id)`, called before events and status; None: open.
        nc: the connection `/healthz` reports on; default: the one under `js`.
        guard: tokens, embed origins and frame-ancestors; it supplies the auth hook.
        metrics_registry: the Prometheus registry its metrics go on (one per process,
            shared with a handler service in it); a new one if None.
    """
    if guard is not None:
        auth = guard.hook
    app = web.Application(middlewares=[errors_and_metrics])
    app[SETTINGS] = settings
    app[JS] = js
    app[NC] = nc if nc is not None else js._nc  # the client the context was made from
    app[STATE] = state
    app[BACKEND] = backend
    app[AUTH] = auth
    app[STREAMS] = streams = StatusStreams(
        js, state, keepalive_s=settings.sse_keepalive_s, authorize=authorize
    )
    app[METRICS] = Metrics(lambda: streams.clients, metrics_registry)
    app[PROXY] = proxy = Proxy(
        backend,
        state,
        frame_ancestors=guard.frame_ancestors if guard else None,
        authorize=authorize,
    )

    async def proxy_session(app: web.Application):
        await app[PROXY].start()
        yield
        await app[PROXY].close()

    async def end_streams(app: web.Application) -> None:
        app[STREAMS].close()
        await app[PROXY].close_websockets()

    app.cleanup_ctx.append(proxy_session)
    app.on_shutdown.append(end_streams)
    app.on_response_prepare.append(cors)

    r = app.router
    r.add_post("/v1/events", post_event)
    r.add_get("/v1/apps", list_apps)
    r.add_get("/v1/apps/{owner}/{title}/status", streams.app_status)
    r.add_get("/v1/jobs/{job_id}/status", streams.job_status)
    r.add_get("/v1/jobs/{job_id}", streams.job_status)
    r.add_get("/apps/{owner}/{title}", proxy.shared_app)
    r.add_get("/apps/{owner}/{title}/", proxy.shared_app)
    r.add_route("*", "/apps/{owner}/{title}/{instance_id}", proxy.handle)
    r.add_route("*", "/apps/{owner}/{title}/{instance_id}/{tail:.*}", proxy.handle)
    r.add_get("/embed.js", static_file("embed.js", "text/javascript"))
    r.add_get("/demo", static_file("demo.html", "text/html"))
    r.add_get("/", root)
    r.add_get("/healthz", healthz)
    r.add_get("/metrics", metrics)
    if guard is not None:
        install(app, guard)
    return app


class GatewayRunner(web.AppRunner):
    """An `AppRunner` that knows the port its one site is bound to."""

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    @property
    def url(self) -> str:
        host, port = self.addresses[0][:2]
        return f"http://{host}:{port}"


async def start_gateway(
    settings: GatewaySettings,
    *,
    js: JetStreamContext,
    state: State,
    backend: Backend | None,
    auth: Auth | None = None,
    nc: Client | None = None,
    guard: Guard | None = None,
    metrics_registry: CollectorRegistry | None = None,
    shutdown_timeout_s: float = 5.0,
) -> GatewayRunner:
    """Build the gateway and listen on `settings.host:settings.port` (0: a free port).

    Returns:
        The started runner; `runner.port` is the bound port. Call `runner.cleanup()` to stop.
    """
    app = make_app(
        settings,
        js=js,
        state=state,
        backend=backend,
        auth=auth,
        nc=nc,
        guard=guard,
        metrics_registry=metrics_registry,
    )
    # No access log: its request line would carry `?token=`. Handlers are cancelled when
    # their client goes, so an SSE stream unsubscribes at once.
    runner = GatewayRunner(
        app, access_log=None, handler_cancellation=True, shutdown_timeout=shutdown_timeout_s
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info("gateway_started", host=settings.host, port=runner.port)
    return runner
