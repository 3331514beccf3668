"""Reverse proxy from `/apps/<owner>/<title>/<instance>/...` to the instance's own server.

With the local backend, app processes listen on loopback ports a browser
cannot reach; the gateway relays to them. The backend's `target(instance)`
says which app an instance serves and where it listens. The path is passed
on unchanged (apps are started with that prefix), bodies are streamed both
ways, and WebSocket upgrades (Bokeh, Panel, Streamlit) become a two-way
relay. One aiohttp client session, without a cookie jar, serves every request.
`/apps/<owner>/<title>/` sends the browser on to the app's shared instance.
"""

import asyncio
import contextlib
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, hdrs, web
from multidict import CIMultiDict
from yarl import URL

from dispatcher import logs
from dispatcher.gateway import GatewayError, error_response
from handlers.deployments import SHARED, slot_key
from handlers.ports import Backend
from handlers.state import State
from schemas import errors as codes
from schemas.names import INSTANCE_ID_RE, check_app
from schemas.status import AppState

log = logs.get("spinyard.gateway")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# The handshake is made again on the upstream side; these belong to the browser's one.
WS_HANDSHAKE = frozenset(
    {
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "sec-websocket-accept",
    }
)
WS_MAX_MSG_BYTES = 32 * 1024 * 1024  # Bokeh's own default limit is 20 MiB
CHUNK = 64 * 1024


def forward_headers(headers: Any, drop: frozenset[str] = frozenset()) -> CIMultiDict:
    """`headers` without hop-by-hop ones, nor those the Connection header names, nor `drop`."""
    named = {
        token.strip().lower()
        for value in headers.getall(hdrs.CONNECTION, [])
        for token in value.split(",")
    }
    out: CIMultiDict = CIMultiDict()
    for key, value in headers.items():
        low = key.lower()
        if low in HOP_BY_HOP or low in named or low in drop:
            continue
        out.add(key, value)
    return out


def merge_csp(policies: list[str], frame_ancestors: str) -> str:
    """The app's own CSP directives, with spinyard's `frame-ancestors` in place of any it set."""
    kept = [
        directive.strip()
        for policy in policies
        for directive in policy.split(";")
        if directive.strip() and not directive.strip().lower().startswith("frame-ancestors")
    ]
    return "; ".join([*kept, frame_ancestors])


def _close_code(code: int | None) -> int:
    """A close code that may be sent on (1005/1006 only describe what happened)."""
    if code is None or code in (1005, 1006) or not (1000 <= code < 5000):
        return WSCloseCode.OK
    return code


class Proxy:
    """Relays HTTP and WebSocket traffic for app instances the backend names."""

    def __init__(
        self,
        backend: Backend | None,
        state: State,
        *,
        connect_timeout_s: float = 10.0,
        frame_ancestors: Callable[[str], Awaitable[str]] | None = None,
        authorize: Callable[[web.Request, str | None, str | None], Awaitable[None]] | None = None,
    ) -> None:
        self.backend = backend
        self.frame_ancestors = frame_ancestors
        self.authorize = authorize
        self.state = state
        self.connect_timeout_s = connect_timeout_s
        self._client: aiohttp.ClientSession | None = None
        self._sockets: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()

    async def start(self) -> None:
        self._client = aiohttp.ClientSession(
            # Never keep one viewer's cookies for another; pass bytes through as the app sent them.
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout_s),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )

    async def close_websockets(self) -> None:
        for ws in list(self._sockets):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"gateway shutting down")

    async def close(self) -> None:
        await self.close_websockets()
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def shared_app(self, request: web.Request) -> web.Response:
        """`/apps/{owner}/{title}/`: on to the shared instance's URL, if one is ready."""
        name = f"{request.match_info['owner']}/{request.match_info['title']}"
        try:
            key = slot_key(check_app(name), SHARED)
        except ValueError as exc:
            raise GatewayError(404, codes.UNKNOWN_APP, f"no app named {name!r}") from exc
        if self.authorize is not None:  # the redirect reveals the instance's URL
            await self.authorize(request, name, None)
        entry = await self.state.deployments.read(key)
        if entry is None or entry.value.state != AppState.READY or not entry.value.url:
            raise GatewayError(404, codes.NOT_FOUND, f"{name!r} has no ready shared instance")
        raise web.HTTPFound(entry.value.url)

    async def upstream_url(self, request: web.Request) -> URL | None:
        """Where the request goes, or None if no instance of this app has that id."""
        owner, title = request.match_info["owner"], request.match_info["title"]
        instance = request.match_info["instance_id"]
        if self.backend is None or not INSTANCE_ID_RE.match(instance):
            return None
        target = await self.backend.target(instance)
        if target is None or target[0] != f"{owner}/{title}":
            return None
        origin = str(URL(target[1]).origin())
        return URL(origin + request.rel_url.raw_path_qs, encoded=True)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        url = await self.upstream_url(request)
        if url is None:
            return error_response(404, codes.NOT_FOUND, "no such app instance")
        assert self._client is not None, "Proxy.start() was not called"
        if request.headers.get(hdrs.UPGRADE, "").lower() == "websocket":
            return await self._websocket(request, url)
        return await self._http(request, url)

    def _headers(self, request: web.Request, drop: frozenset[str] = frozenset()) -> CIMultiDict:
        headers = forward_headers(request.headers, drop)
        # Host stays the gateway's: apps compare it with Origin (Tornado's check_origin).
        previous = request.headers.get("X-Forwarded-For")
        peer = request.remote or ""
        headers["X-Forwarded-For"] = f"{previous}, {peer}" if previous else peer
        headers["X-Forwarded-Proto"] = request.scheme
        headers["X-Forwarded-Host"] = request.host
        return headers

    async def _http(self, request: web.Request, url: URL) -> web.StreamResponse:
        assert self._client is not None
        body = request.content if request.body_exists else None
        try:
            upstream = await self._client.request(
                request.method,
                url,
                headers=self._headers(request),
                data=body,
                allow_redirects=False,
            )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning("proxy_upstream_failed", url_path=url.path, error=type(exc).__name__)
            return error_response(502, codes.UNAVAILABLE, "the app instance did not answer")
        async with upstream:
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=forward_headers(upstream.headers),
            )
            if self.frame_ancestors is not None:
                app = f"{request.match_info['owner']}/{request.match_info['title']}"
                ours = await self.frame_ancestors(app)
                response.headers["Content-Security-Policy"] = merge_csp(
                    response.headers.getall("Content-Security-Policy", []), ours
                )
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    await response.write(chunk)
            except ConnectionError:
                return response  # the browser went away
            except (TimeoutError, aiohttp.ClientError) as exc:
                # Too late for an error status: cut the connection so the truncation shows.
                log.warning("proxy_stream_broken", url_path=url.path, error=type(exc).__name__)
                if request.transport is not None:
                    request.transport.close()
                return response
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
            return response

    async def _websocket(self, request: web.Request, url: URL) -> web.StreamResponse:
        assert self._client is not None
        protocols = [
            p.strip()
            for p in request.headers.get(hdrs.SEC_WEBSOCKET_PROTOCOL, "").split(",")
            if p.strip()
        ]
        try:
            upstream = await self._client.ws_connect(
                url.with_scheme("wss" if url.scheme == "https" else "ws"),
                headers=self._headers(request, WS_HANDSHAKE),
                protocols=protocols,
                max_msg_size=WS_MAX_MSG_BYTES,
            )
        except aiohttp.WSServerHandshakeError as exc:
            log.warning("proxy_ws_refused", url_path=url.path, status=exc.status)
            return error_response(502, codes.UNAVAILABLE, "the app instance refused the WebSocket")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning("proxy_upstream_failed", url_path=url.path, error=type(exc).__name__)
            return error_response(502, codes.UNAVAILABLE, "the app instance did not answer")

        async with upstream:
            downstream = web.WebSocketResponse(
                protocols=[upstream.protocol] if upstream.protocol else (),
                max_msg_size=WS_MAX_MSG_BYTES,
            )
            await downstream.prepare(request)
            self._sockets.add(downstream)
            pumps = [
                asyncio.create_task(_pump(downstream, upstream), name="ws-to-app"),
                asyncio.create_task(_pump(upstream, downstream), name="ws-to-browser"),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in pumps:
                    task.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                if not upstream.closed:
                    await upstream.close(code=_close_code(downstream.close_code))
                if not downstream.closed:
                    await downstream.close(code=_close_code(upstream.close_code))
            return downstream


async def _pump(
    src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
    dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
) -> None:
    """Copy text and binary messages from `src` to `dst` until `src` closes."""
    try:
        async for msg in src:
            if msg.type == WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif msg.type == WSMsgType.ERROR:
                return
    except ConnectionError:
        return
