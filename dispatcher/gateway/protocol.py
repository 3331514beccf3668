"""The gateway's HTTP connections: a read deadline, and parser errors as the JSON error body.

aiohttp (3.14) has no timeout on reading a request: a client may trickle a
request's head, or its body, a byte at a time and hold the connection for as
long as it likes (150 such connections stayed open for 30 s and more). Its
only clock is the keep-alive timeout, which also decides how long an idle
connection is kept for a reverse proxy. So each connection here is given
`read_timeout_s` to deliver a request's head, counted from the connection's
start or from the head's first byte, and as long again for the body from the
end of the head; a connection that misses either is closed. The clock stops
once a request is complete, so answers that take long (SSE status streams,
proxied apps) and WebSockets are never cut by it.

A request aiohttp cannot parse never reaches the app or its middlewares;
aiohttp answers it with a text body that quotes the offending bytes (and logs
them). Here it gets the gateway's JSON error body with a fixed message, and
a log line naming only the kind of error.

An SSE status stream, once its headers are sent, has no more use for
aiohttp: `detach` takes its connection away, and aiohttp's objects for it
(the connection's handler and parser, the request, the response and the two
tasks, about 7 KB a stream) are freed; the stream writes to the socket
itself (`fanout.Client`).

`RequestHandler` and `Server` are aiohttp's low-level classes; this module
relies on their `_request_count`, `_messages`, `_request_in_progress`,
`_upgraded`, `_manager`, `_loop` and `_kwargs`, which the gateway tests
exercise.
"""

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from dispatcher import logs
from schemas import errors as codes
from schemas.errors import ErrorBody

log = logs.get("spinyard.gateway")


class Connection(RequestHandler):
    """One client connection, held to the read deadline."""

    def __init__(self, manager: web.Server, *, read_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._read_timeout_s = read_timeout_s
        self._deadline: asyncio.TimerHandle | None = None
        self._body: Any = None  # the payload whose arrival the deadline times, if any

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._start_clock(None)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_clock()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            # A head arrived: time its body, if one is still to come.
            payload = self._messages[-1][1] if self._messages else None
            if payload is not None and not payload.is_eof():
                self._start_clock(payload)
            else:
                self._stop_clock()
        elif data and self._deadline is None and self._awaiting_head():
            self._start_clock(None)

    def _awaiting_head(self) -> bool:
        return not (self._upgraded or self._request_in_progress or self._messages)

    def _start_clock(self, body: Any) -> None:
        self._stop_clock()
        self._body = body
        self._deadline = self._loop.call_later(self._read_timeout_s, self._expired)

    def _stop_clock(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline, self._body = None, None

    def _expired(self) -> None:
        body = self._body
        self._deadline, self._body = None, None
        slow = not body.is_eof() if body is not None else self._awaiting_head()
        if slow and self.transport is not None:
            peer = self.transport.get_extra_info("peername")
            log.info(
                "slow_request_closed",
                phase="body" if body is not None else "head",
                after_s=self._read_timeout_s,
                peer=peer[0] if isinstance(peer, tuple) else None,
            )
            self.force_close()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The error body for what the app never saw: unparsable requests, mostly.

        Unlike aiohttp's own, it never quotes the request, in the answer or the log.
        """
        if request.writer.output_size > 0:
            raise ConnectionError("the answer had started; it cannot become an error")
        if status < 500:
            log.info("request_unparsable", status=status, error=type(exc).__name__)
            code, text = codes.BAD_REQUEST, "the request is not valid HTTP/1.1"
        else:
            log.error("request_failed", status=status, error=type(exc).__name__)
            code, text = codes.INTERNAL, "internal error"
        body = ErrorBody.of(code, text).model_dump(mode="json")
        response = web.json_response(body, status=status)
        response.force_close()
        return response


def detach(handler: RequestHandler) -> asyncio.Transport | None:
    """Take `handler`'s connection from aiohttp, during a request whose answer's headers are
    sent and whose rest the caller writes; None if the connection is already gone.

    aiohttp then ends its request loop after this request, writing and closing nothing
    (its `transport` is None to it), and forgets the connection: the server no longer
    lists it (nor shuts it down: that is the new owner's), and no timer of it is left, so
    the handler, its parser, the request and their tasks are freed once the request's
    handler returns. Requests pipelined behind this one are dropped unanswered; they
    would never have been answered behind a stream that does not end.
    """
    transport = handler.transport
    if transport is None or transport.is_closing():
        return None
    if isinstance(handler, Connection):
        handler._stop_clock()
    handler.keep_alive(False)  # cancels its keep-alive timer, which would hold it
    if handler._manager is not None:
        handler._manager.connection_lost(handler)  # dropped once its request loop ends
    handler.transport = None
    handler.force_close()  # with no transport: only "no further request"
    return transport


class Server(web.Server):
    """aiohttp's server, making `Connection`s."""

    def __init__(self, *args: Any, read_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout_s = read_timeout_s

    def __call__(self) -> RequestHandler:
        return Connection(self, loop=self._loop, read_timeout_s=self.read_timeout_s, **self._kwargs)

    @classmethod
    def like(cls, server: web.Server, read_timeout_s: float) -> "Server":
        """The server aiohttp made for an app, with the deadline added."""
        return cls(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            read_timeout_s=read_timeout_s,
            **server._kwargs,
        )
