"""Status for browsers: the last status as JSON, or a Server-Sent Events stream of changes.

`GET /v1/apps/{owner}/{title}/status`, `GET /v1/jobs/{id}/status` and
`GET /v1/jobs/{id}` read the JetStream status stream, which keeps the last
message per subject; payloads (msgpack of any shape) go out as JSON.

An SSE client joins its subject's topic (`fanout`): one ordered JetStream
consumer per subject on this gateway, shared by all of that subject's
clients, whose last status is kept in memory. A new client is sent that
status at once (the first client of a subject, the stream's last message
for the subject, from the consumer), then every change, in order, with
nothing lost between the two; `fanout` says why. Headers are sent once the
subscription exists, so a client that got them misses no change. Then the
handler returns: the stream's `Client` takes its connection over from
aiohttp (`protocol.detach`) and writes the statuses itself, so an open
stream holds no task, request or response. Every stream is ended when the
gateway shuts down (its last chunk, then a close; a client that stopped
reading is cut at cleanup), and a comment line keeps an idle stream open
through proxies.
"""

from collections.abc import Awaitable, Callable

import nats.errors
from aiohttp import web
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from dispatcher import logs
from dispatcher.gateway import SESSION, GatewayError, error_response
from dispatcher.gateway.fanout import Client, Fanout, to_json
from dispatcher.gateway.protocol import detach
from schemas import errors as codes
from schemas import subjects
from schemas.names import JOB_ID_RE, check_app, check_session
from schemas.spec import AppSpec

log = logs.get("spinyard.gateway")

RETRY_MS = 2000
HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache, no-transform",
    "X-Accel-Buffering": "no",
}

Authorize = Callable[[web.Request, str | None, str | None], Awaitable[None]]


def wants_sse(request: web.Request) -> bool:
    """A stream for a GET that accepts one; HEAD gets the snapshot's headers."""
    return request.method == "GET" and "text/event-stream" in request.headers.get("Accept", "")


class StatusStreams:
    """The status routes, and the open SSE streams: counted for metrics, ended at shutdown."""

    def __init__(
        self,
        js: JetStreamContext,
        app_spec: Callable[[str], Awaitable[AppSpec | None]],
        *,
        keepalive_s: float,
        authorize: Authorize,
        linger_s: float = 3.0,
        heartbeat_s: float = 5.0,
    ) -> None:
        """
        Args:
            js: where status is read and subscribed to.
            app_spec: an app's spec by name, or None (the gateway's watched cache).
            keepalive_s: an idle stream gets a comment line this often.
            authorize: the auth hook's runner, `(request, app, job_id)`.
            linger_s: a subject's subscription outlives its last client this long.
            heartbeat_s: the NATS server's idle heartbeat on each subscription.
        """
        self.js = js
        self.app_spec = app_spec
        self.keepalive_s = keepalive_s
        self.authorize = authorize
        self.fanout = Fanout(
            js, keepalive_s=keepalive_s, linger_s=linger_s, heartbeat_s=heartbeat_s
        )
        self._closing = False

    @property
    def clients(self) -> int:
        return self.fanout.clients

    def close(self) -> None:
        """End every open stream (on gateway shutdown)."""
        self._closing = True
        self.fanout.end_all()

    async def aclose(self) -> None:
        """Delete every subscription (on gateway cleanup, after the streams ended)."""
        await self.fanout.close()

    async def app_status(self, request: web.Request) -> web.StreamResponse:
        """`GET /v1/apps/{owner}/{title}/status`; `?session=` is for per-session apps only."""
        name = f"{request.match_info['owner']}/{request.match_info['title']}"
        subject = await self._app_subject(request, name)
        if wants_sse(request):
            return await self.stream(request, subject)
        return await self.snapshot(subject, name)

    async def _app_subject(self, request: web.Request, name: str) -> str:
        """The status subject of app `name` (and `?session=`), once the caller may see it.

        Its own function so that no stream holds the app's spec while it is open.
        """
        try:
            check_app(name)
        except ValueError as exc:
            raise GatewayError(404, codes.UNKNOWN_APP, f"no app named {name!r}") from exc
        request[SESSION] = request.query.get("session")
        await self.authorize(request, name, None)
        spec = await self.app_spec(name)
        if spec is None:
            raise GatewayError(404, codes.UNKNOWN_APP, f"no app named {name!r}")
        if spec.sharing != "per_session":
            return subjects.app_status(name)
        session = request.query.get("session")
        if not session:
            message = f"{name!r} gives each viewer an instance: add ?session="
            raise GatewayError(400, codes.BAD_REQUEST, message)
        try:
            check_session(session)
        except ValueError as exc:
            raise GatewayError(400, codes.BAD_REQUEST, f"session: {exc}") from exc
        return subjects.app_status(name, session)

    async def job_status(self, request: web.Request) -> web.StreamResponse:
        """`GET /v1/jobs/{job_id}/status` (JSON or SSE) and `GET /v1/jobs/{job_id}` (JSON)."""
        job_id = request.match_info["job_id"]
        if not JOB_ID_RE.match(job_id):
            raise GatewayError(400, codes.BAD_REQUEST, "a job id looks like j-<8-40 of a-z0-9>")
        await self.authorize(request, None, job_id)
        if wants_sse(request) and request.path.endswith("/status"):
            return await self.stream(request, subjects.job_status(job_id))
        return await self.snapshot(subjects.job_status(job_id), job_id)

    async def snapshot(self, subject: str, what: str) -> web.Response:
        """The last status on `subject` as JSON.

        Raises:
            GatewayError: 404 when there is none yet, 503 when NATS does not answer.
        """
        try:
            msg = await self.js.get_last_msg(subjects.STATUS_STREAM, subject, direct=True)
        except NotFoundError as exc:
            raise GatewayError(404, codes.NOT_FOUND, f"no status yet for {what}") from exc
        except (nats.errors.Error, ConnectionError) as exc:
            raise GatewayError(503, codes.UNAVAILABLE, "the event bus is not reachable") from exc
        data = to_json(msg.data)
        if data is None:
            log.warning("status_undecodable", subject=subject)
            raise GatewayError(404, codes.NOT_FOUND, f"no readable status for {what}")
        return web.Response(text=data, content_type="application/json")

    async def stream(self, request: web.Request, subject: str) -> web.StreamResponse:
        """Answer with the current status on `subject`, then each change, until the client goes.

        The handler returns once the headers are sent: from then on the stream is its
        `Client`'s, which owns the connection. It counts in the request metrics then, as
        answered (200); a client that goes before that is a 499.
        """
        if self._closing:
            return error_response(503, codes.UNAVAILABLE, "the gateway is shutting down")
        client = Client()
        topic = self.fanout.join(subject, client)
        try:
            try:
                await self.fanout.ready(topic)
            except (nats.errors.Error, ConnectionError):
                return error_response(503, codes.UNAVAILABLE, "the event bus is not reachable")
            if client.ended:
                return error_response(503, codes.UNAVAILABLE, "the gateway is shutting down")
            response = Handover(headers=HEADERS)
            await response.prepare(request)
            await response.write(f"retry: {RETRY_MS}\n\n".encode())  # sends the headers too
            paused = request.protocol.writing_paused
            transport = detach(request.protocol)
            if transport is not None:
                response.handed_over = True
                chunked = response.headers.get("Transfer-Encoding") == "chunked"  # HTTP/1.1
                client.attach(transport, chunked=chunked, paused=paused)
            return response
        finally:
            if client.transport is None:
                client.leave()


class Handover(web.StreamResponse):
    """An SSE answer whose end, once its connection is handed over, is the stream's `Client`'s
    to write: aiohttp's own end of the request then writes nothing."""

    handed_over = False

    async def write_eof(self, data: bytes = b"") -> None:
        if not self.handed_over:
            await super().write_eof(data)
