"""Status for browsers: the last status as JSON, or a Server-Sent Events stream of changes.

`GET /v1/apps/{owner}/{title}/status`, `GET /v1/jobs/{id}/status` and
`GET /v1/jobs/{id}` read the JetStream status stream, which keeps the last
message per subject; payloads (msgpack of any shape) go out as JSON.

Each SSE client gets
its own ordered push consumer on its one subject with deliver policy
LAST_PER_SUBJECT: the server sends the current status, then every change,
in order, with nothing lost between the two. The consumer is unsubscribed
(then deleted) the moment the client goes, and every stream is ended when
the gateway shuts down.
"""

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
from aiohttp import web
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from dispatcher import logs
from dispatcher.gateway import SESSION, GatewayError, error_response
from handlers.state import State
from schemas import codec, subjects
from schemas import errors as codes
from schemas.names import JOB_ID_RE, check_app, check_session

log = logs.get("spinyard.gateway")

# Status is last-value: a client that falls this far behind only misses stale states.
QUEUE_SIZE = 64
RETRY_MS = 2000
_END = object()

Authorize = Callable[[web.Request, str | None, str | None], Awaitable[None]]


def wants_sse(request: web.Request) -> bool:
    """A stream for a GET that accepts one; HEAD gets the snapshot's headers."""
    return request.method == "GET" and "text/event-stream" in request.headers.get("Accept", "")


def to_json(data: bytes | None) -> str | None:
    """A status payload (msgpack of any shape) as one line of strict JSON, or None if it has
    none (undecodable, or holding NaN, which browsers' `JSON.parse` refuses)."""
    try:
        obj = codec.loads(data or b"")
        return json.dumps(obj, separators=(",", ":"), default=_jsonable, allow_nan=False)
    except (codec.DecodeError, TypeError, ValueError):
        return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"cannot encode {type(value).__name__}")


def _offer(queue: asyncio.Queue, item: Any) -> None:
    """Queue `item`, dropping the oldest status if the client is far behind."""
    while True:
        try:
            queue.put_nowait(item)
            return
        except asyncio.QueueFull:
            queue.get_nowait()


def _gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


class StatusStreams:
    """The status routes, and the open SSE streams: counted for metrics, ended at shutdown."""

    def __init__(
        self, js: JetStreamContext, state: State, *, keepalive_s: float, authorize: Authorize
    ) -> None:
        self.js = js
        self.state = state
        self.keepalive_s = keepalive_s
        self.authorize = authorize
        self._queues: set[asyncio.Queue] = set()
        self._closing = False

    @property
    def clients(self) -> int:
        return len(self._queues)

    def close(self) -> None:
        """End every open stream (on gateway shutdown)."""
        self._closing = True
        for queue in self._queues:
            _offer(queue, _END)

    async def app_status(self, request: web.Request) -> web.StreamResponse:
        """`GET /v1/apps/{owner}/{title}/status`; `?session=` is for per-session apps only."""
        name = f"{request.match_info['owner']}/{request.match_info['title']}"
        try:
            check_app(name)
        except ValueError as exc:
            raise GatewayError(404, codes.UNKNOWN_APP, f"no app named {name!r}") from exc
        request[SESSION] = request.query.get("session")
        await self.authorize(request, name, None)
        spec = await self.state.apps.get(name)
        if spec is None:
            raise GatewayError(404, codes.UNKNOWN_APP, f"no app named {name!r}")
        session = None
        if spec.sharing == "per_session":
            session = request.query.get("session")
            if not session:
                message = f"{name!r} gives each viewer an instance: add ?session="
                raise GatewayError(400, codes.BAD_REQUEST, message)
            try:
                check_session(session)
            except ValueError as exc:
                raise GatewayError(400, codes.BAD_REQUEST, f"session: {exc}") from exc
        subject = subjects.app_status(name, session)
        if wants_sse(request):
            return await self.stream(request, subject)
        return await self.snapshot(subject, name)

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
        """Answer with the current status on `subject`, then each change, until the client goes."""
        if self._closing:
            return error_response(503, codes.UNAVAILABLE, "the gateway is shutting down")
        queue: asyncio.Queue = asyncio.Queue(QUEUE_SIZE)

        async def deliver(msg: Msg) -> None:
            _offer(queue, msg)

        try:
            sub = await self.js.subscribe(
                subject,
                stream=subjects.STATUS_STREAM,
                cb=deliver,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            )
        except (nats.errors.Error, ConnectionError) as exc:
            log.warning("status_subscribe_failed", subject=subject, error=type(exc).__name__)
            return error_response(503, codes.UNAVAILABLE, "the event bus is not reachable")

        self._queues.add(queue)
        log.debug("status_stream_opened", subject=subject)
        try:
            response = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache, no-transform",
                    "X-Accel-Buffering": "no",
                }
            )
            await response.prepare(request)
            await response.write(f"retry: {RETRY_MS}\n\n".encode())
            await self._pump(request, response, queue, subject)
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
            return response
        finally:
            # Unsubscribe first: nothing else may run while the consumer still pushes to us.
            self._queues.discard(queue)
            await _unsubscribe(self.js, sub, subject)

    async def _pump(
        self, request: web.Request, response: web.StreamResponse, queue: asyncio.Queue, subject: str
    ) -> None:
        while True:
            try:
                async with asyncio.timeout(self.keepalive_s):
                    item = await queue.get()
            except TimeoutError:
                if _gone(request):
                    return
                item = None
            if item is _END:
                return
            if item is None:
                chunk = b": keepalive\n\n"
            else:
                data = to_json(item.data)
                if data is None:
                    log.warning("status_undecodable", subject=subject)
                    continue
                seq = item.metadata.sequence.stream
                chunk = f"id: {seq}\nevent: status\ndata: {data}\n\n".encode()
            try:
                await response.write(chunk)
            except ConnectionError:
                return


async def _unsubscribe(js: JetStreamContext, sub: Any, subject: str) -> None:
    """Stop the push consumer and delete it, so it stops costing the server at once."""
    try:
        await sub.unsubscribe()
    except nats.errors.Error as exc:
        log.debug("status_unsubscribe_failed", subject=subject, error=type(exc).__name__)
        return
    consumer = getattr(sub, "_consumer", None)  # nats-py keeps the name here, and nowhere public
    if consumer:
        try:
            await js.delete_consumer(subjects.STATUS_STREAM, consumer)
        except (nats.errors.Error, ConnectionError) as exc:
            # The server deletes an ephemeral consumer with no interest after a few seconds anyway.
            log.debug("status_consumer_delete_failed", subject=subject, error=type(exc).__name__)
    log.debug("status_stream_closed", subject=subject)
