"""The gateway's routes and wiring: pages publish events and read status here.

It builds the aiohttp app: events (`events`, `POST /v1/events`), the app
list, publishing apps (`publish`) and their secrets (`secrets`), status (`sse`), the app proxy
(`proxy`), `embed.js`, the demo page,
`/healthz`, `/metrics` and its OpenAPI document (`openapi`), with the
middleware that gives every error the public error body (routing and
method errors too) and counts every answer; and it starts it on connections
held to a read deadline (`protocol`). It uses the NATS connection its
caller owns and never opens one itself.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats.errors
from aiohttp import web
from nats.aio.client import Client
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry

from dispatcher import logs
from dispatcher.backends.secrets import SecretStore
from dispatcher.gateway import GatewayError, Metrics, error_response
from dispatcher.gateway.events import Auth, authorize, post_event
from dispatcher.gateway.keys import (
    API,
    AUTH,
    BACKEND,
    GUARD,
    JS,
    METRICS,
    NC,
    PROXY,
    SECRETS,
    SETTINGS,
    SPECS,
    STATE,
    STREAMS,
)
from dispatcher.gateway.openapi import document
from dispatcher.gateway.protocol import Server
from dispatcher.gateway.proxy import Proxy
from dispatcher.gateway.publish import add_routes as add_publish_routes
from dispatcher.gateway.secrets import add_routes as add_secrets_routes
from dispatcher.gateway.security import Guard, install
from dispatcher.gateway.specs import SpecCache
from dispatcher.gateway.sse import StatusStreams
from dispatcher.metrics import exposition
from dispatcher.settings import GatewaySettings
from handlers.ports import Backend
from handlers.state import State
from schemas import errors as codes
from schemas.answers import AppSummary, Health, PoolSize
from schemas.schedule import scheduled_pool
from schemas.spec import AppSpec

log = logs.get("spinyard.gateway")

STATIC = Path(__file__).parent / "static"
# --- apps --------------------------------------------------------------------------------


def _pool(spec: AppSpec, now: float) -> PoolSize:
    if not spec.schedule:
        return PoolSize(size=spec.pool.size)
    scheduled = scheduled_pool(spec.schedule, now)
    current = spec.pool.size if scheduled is None else scheduled
    return PoolSize(size=spec.pool.size, schedule=spec.schedule, now=current)


async def list_apps(request: web.Request) -> web.Response:
    now = time.time()
    specs = sorted((e.value for e in await request.app[STATE].apps.scan()), key=lambda s: s.name)
    apps = [
        AppSummary(
            name=s.name,
            kind=s.kind,
            sharing=s.sharing,
            pool=_pool(s, now),
            description=s.description,
            example_inputs=s.example_inputs if s.kind == "job" else None,
        ).model_dump(mode="json", exclude_none=True)
        for s in specs
    ]
    return web.json_response(apps)


# --- service routes -----------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    connected = request.app[NC].is_connected
    body = Health(ok=connected, nats=connected).model_dump(mode="json")
    return web.json_response(body, status=200 if connected else 503)


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[API], headers={"Cache-Control": "public, max-age=300"})


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
            "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, Last-Event-ID",
            "Access-Control-Max-Age": "600",
        },
    )


# --- wiring -------------------------------------------------------------------------------


def route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


# aiohttp's routing and body errors, as error codes.
CODE_OF_STATUS = {
    404: codes.NOT_FOUND,
    405: codes.METHOD_NOT_ALLOWED,
    413: codes.TOO_LARGE,
}


def http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """An aiohttp `HTTPException` (no such route, wrong method, ...) with the error body."""
    code = CODE_OF_STATUS.get(exc.status, codes.BAD_REQUEST)
    message = exc.reason
    if exc.status == 404:
        message = "no such path"
    elif exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        message = f"{request.method} is not allowed here; allowed: {allowed.replace(',', ', ')}"
    response = error_response(exc.status, code, message)
    if "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


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
        if exc.status < 400:
            raise
        return http_error(request, exc)
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
    secrets: SecretStore | None = None,
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
        secrets: where apps' secrets are written (the backend's store); None: no
            secrets routes.
    """
    app = web.Application(middlewares=[errors_and_metrics])
    app[SPECS] = specs = SpecCache(
        state.apps, size=settings.spec_cache_size, max_age_s=settings.spec_cache_max_age_s
    )
    if guard is not None:
        auth = guard.hook
        guard.use_specs(specs)
    app[SETTINGS] = settings
    app[JS] = js
    app[NC] = nc if nc is not None else js._nc  # the client the context was made from
    app[STATE] = state
    app[BACKEND] = backend
    app[AUTH] = auth
    app[GUARD] = guard
    app[SECRETS] = secrets
    app[STREAMS] = streams = StatusStreams(
        js,
        specs.get,
        keepalive_s=settings.sse_keepalive_s,
        authorize=authorize,
        linger_s=settings.sse_linger_s,
        heartbeat_s=settings.sse_heartbeat_s,
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

    async def watch_specs(app: web.Application):
        await app[SPECS].start()
        yield
        await app[SPECS].stop()

    async def end_streams(app: web.Application) -> None:
        app[STREAMS].close()
        await app[PROXY].close_websockets()

    async def drop_subscriptions(app: web.Application) -> None:
        await app[STREAMS].aclose()

    app.cleanup_ctx.append(proxy_session)
    app.cleanup_ctx.append(watch_specs)
    app.on_shutdown.append(end_streams)
    app.on_cleanup.append(drop_subscriptions)
    app.on_response_prepare.append(cors)

    r = app.router
    r.add_post("/v1/events", post_event)
    r.add_get("/v1/apps", list_apps)
    r.add_get("/v1/apps/{owner}/{title}/status", streams.app_status)
    add_publish_routes(r)
    if secrets is not None:
        add_secrets_routes(r)
    r.add_get("/v1/jobs/{job_id}/status", streams.job_status)
    r.add_get("/v1/jobs/{job_id}", streams.job_status)
    r.add_get("/apps/{owner}/{title}", proxy.shared_app)
    r.add_get("/apps/{owner}/{title}/", proxy.shared_app)
    r.add_route("*", "/apps/{owner}/{title}/{instance_id}", proxy.handle)
    r.add_route("*", "/apps/{owner}/{title}/{instance_id}/{tail:.*}", proxy.handle)
    r.add_get("/embed.js", static_file("embed.js", "text/javascript"))
    r.add_get("/demo", static_file("demo.html", "text/html"))
    # Browsers ask for /favicon.ico on every page of the origin; the demo links the SVG.
    r.add_get("/favicon.ico", static_file("favicon.svg", "image/svg+xml"))
    r.add_get("/favicon.svg", static_file("favicon.svg", "image/svg+xml"))
    r.add_get("/", root)
    r.add_get("/healthz", healthz)
    r.add_get("/metrics", metrics)
    r.add_get("/v1/openapi.json", openapi)
    if guard is not None:
        install(app, guard)
    app[API] = document(app)
    return app


class GatewayRunner(web.AppRunner):
    """An `AppRunner` that knows the port its one site is bound to, and whose connections
    are held to the read deadline."""

    def __init__(self, app: web.Application, *, read_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.read_timeout_s = read_timeout_s

    async def _make_server(self) -> web.Server:
        return Server.like(await super()._make_server(), self.read_timeout_s)

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
    secrets: SecretStore | None = None,
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
        secrets=secrets,
    )
    # No access log: its request line would carry `?token=`. Handlers are cancelled when
    # their client goes, so an SSE stream still waiting for its subscription leaves at once
    # (an open one is no longer aiohttp's: its `fanout.Client` sees the client go).
    runner = GatewayRunner(
        app,
        read_timeout_s=settings.read_timeout_s,
        keepalive_timeout=settings.idle_timeout_s,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=shutdown_timeout_s,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
    except BaseException:
        await runner.cleanup()
        raise
    log.info("gateway_started", host=settings.host, port=runner.port)
    return runner
