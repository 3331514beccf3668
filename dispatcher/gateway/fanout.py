"""Status fan-out: one shared JetStream subscription per status subject, for all its SSE clients.

A lecture hall watches one app: a thousand browsers on one status subject.
Giving each its own JetStream consumer cost the server a consumer per
browser (creation refused past about a thousand of them) and the gateway
23 KB and a consumer round trip per stream. Here a `Topic` per subject holds
one ordered push consumer (deliver policy LAST_PER_SUBJECT, filtered on the
subject) that every client of that subject on this gateway shares, and the
last status it delivered, already framed as an SSE event; each client is a
`Client`, a few slots and its own small backlog, which once its headers are
sent is its connection's protocol: aiohttp has let the connection go
(`protocol.detach`) and the fan-out writes to the socket itself. An open
stream is then its socket's transport and a `Client`, about 1.7 KB in all,
where aiohttp's connection handler, parser, request, response and two tasks
held 11 KB more (docs/benchmarks.md, fanout).

Why nothing is lost between the snapshot and the first change, and nothing
goes backwards:

- The consumer is the snapshot and the changes in one: the server starts it
  at the subject's last message and then delivers every later one in stream
  order. A status published while it is being created is either that last
  message or one after it; there is no window between a "get" and a
  "subscribe" to fall into.
- A client joins its topic (synchronously, in the event loop) before the
  subscription exists or, if it exists, with the last status offered to it
  at once: the status in memory is exactly what every earlier client has
  been sent, and every later one reaches it too.
- Each status carries its stream sequence (sent as the SSE `id:`); a topic
  ignores any message at or below the last one it passed on, so a consumer
  that nats-py re-creates (after missed heartbeats, a NATS restart, a
  reconnect) may re-deliver but never moves a client back.
- A slow client's socket takes what it can and its transport buffers up to
  its high-water mark (64 KiB); past that (`pause_writing`), its backlog keeps
  the newest `QUEUE_SIZE` statuses (older ones are dropped) until the socket
  drains (`resume_writing`): status is last-value, so it misses only stale
  states, and the fan-out never waits for any client.
- A status reaches a client in order whichever way it goes: written at once
  only when nothing is queued before it, else queued behind what is.

The consumer is deleted when the last client of its subject has been gone
for `linger_s` (a page that reloads finds it still there). The alternative
of a core NATS subscription plus a direct get for the snapshot was not
taken: a core message carries no stream sequence to order it against the
snapshot by, and a status published just before the subscription reached the
server but stored just after the get would be lost.
"""

import asyncio
import contextlib
import json
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from dispatcher import logs
from schemas import codec, subjects

log = logs.get("spinyard.gateway")

# Status is last-value: a client that falls this far behind only misses stale states.
QUEUE_SIZE = 64
KEEPALIVE = b": keepalive\n\n"
KEEPALIVE_CHUNK = b"%x\r\n%b\r\n" % (len(KEEPALIVE), KEEPALIVE)


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


class Client(asyncio.Protocol):
    """One SSE stream of a topic. Until its headers are sent, the statuses offered to it wait
    in `pending`; then it takes its connection over from aiohttp (`attach`) and is the
    transport's protocol: statuses and keep-alives are written to the socket from the
    fan-out loop and the keep-alive timer, with no task, coroutine or aiohttp object per
    open stream (what they cost is in docs/benchmarks.md, fanout)."""

    __slots__ = ("chunked", "ended", "paused", "pending", "topic", "transport")

    def __init__(self) -> None:
        # A list, made when needed: a client mostly has nothing waiting, and a deque's
        # first block alone is 600 bytes, a lot next to an open stream's few KB.
        self.pending: list[bytes] | None = None
        self.topic: Topic | None = None
        self.transport: asyncio.Transport | None = None
        self.chunked = False  # the answer is HTTP/1.1 chunked: each write is one chunk
        self.paused = False  # the socket is backed up (the transport's flow control)
        self.ended = False

    def attach(self, transport: asyncio.Transport, *, chunked: bool, paused: bool) -> None:
        """Own `transport` from now on (the answer's headers are sent and aiohttp has let it
        go: `protocol.detach`), and write what is waiting.

        Args:
            transport: the stream's connection.
            chunked: the answer uses HTTP/1.1 chunked encoding.
            paused: the transport had asked its former protocol to stop writing.
        """
        transport.set_protocol(self)
        self.transport, self.chunked, self.paused = transport, chunked, paused
        if not transport.is_reading():
            transport.resume_reading()  # a client's close is seen by reading
        if self.ended:
            self.end()
        else:
            self._flush()

    def offer(self, chunk: bytes, framed: bytes | None) -> None:
        """Send `chunk` (`framed`: the same as one HTTP chunk, when the caller has it), or
        queue it, dropping the oldest when `QUEUE_SIZE` are waiting.

        It is written at once when the stream is attached, its socket is not backed up and
        nothing is queued before it: one socket write per stream, not also a task wake-up.
        Otherwise it waits (for the headers, or for the socket to drain), so order holds
        and a slow client never holds up the loop.
        """
        if self.ended:
            return
        if self.transport is not None and not self.paused and not self.pending:
            self._write(chunk, framed)
            return
        pending = self.pending
        if pending is None:
            self.pending = [chunk]
        else:
            if len(pending) >= QUEUE_SIZE:
                del pending[0]
            pending.append(chunk)

    def keepalive(self) -> None:
        """Write a keep-alive comment, unless the stream is not idle (not attached yet,
        statuses waiting, the socket backed up)."""
        if self.transport is not None and not (self.paused or self.pending or self.ended):
            self._write(KEEPALIVE, KEEPALIVE_CHUNK)

    def end(self) -> None:
        """End the stream (the gateway is shutting down, or the client sent more): its last
        chunk, then a close once what is buffered is sent (before `attach`: once attached)."""
        self.ended = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if self.chunked:
                transport.write(b"0\r\n\r\n")
            transport.close()

    def abort(self) -> None:
        """Close the connection at once, dropping what its socket has not taken."""
        if self.transport is not None:
            self.transport.abort()

    def leave(self) -> None:
        """Leave the topic (once: the client went, or its request failed)."""
        topic, self.topic = self.topic, None
        if topic is not None:
            topic.fanout.leave(topic, self)

    def _write(self, chunk: bytes, framed: bytes | None) -> None:
        assert self.transport is not None
        if self.chunked:
            self.transport.write(framed or b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            self.transport.write(chunk)

    def _flush(self) -> None:
        while self.pending and not self.paused and self.transport is not None:
            chunk = self.pending.pop(0)
            if not self.pending:
                self.pending = None
            self._write(chunk, None)

    # asyncio.Protocol, once attached

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if not self.ended:
            self._flush()

    def data_received(self, data: bytes) -> None:
        """A stream's client has nothing more to send: anything (a pipelined request) is
        one that would never be answered, so the stream ends."""
        self.end()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.ended = True
        self.leave()


class Topic:
    """One status subject on this gateway: its shared subscription, last status and clients."""

    __slots__ = ("chunk", "clients", "fanout", "framed", "linger", "ready", "seq", "subject")

    def __init__(self, subject: str, fanout: "Fanout") -> None:
        self.subject = subject
        self.fanout = fanout
        self.clients: set[Client] = set()
        self.seq = 0  # stream sequence of the last status passed on
        self.chunk: bytes | None = None  # that status as an SSE event
        self.framed: bytes | None = None  # and as one HTTP chunk
        self.ready: asyncio.Task | None = None  # subscribing; its result is the subscription
        self.linger: asyncio.TimerHandle | None = None

    def join(self, client: Client) -> None:
        client.topic = self
        if self.chunk is not None:
            client.offer(self.chunk, self.framed)
        self.clients.add(client)

    async def on_msg(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        if seq <= self.seq:
            return  # re-delivered by a re-created consumer: never go back
        self.seq = seq
        data = to_json(msg.data)
        if data is None:
            log.warning("status_undecodable", subject=self.subject)
            return
        self.chunk = chunk = f"id: {seq}\nevent: status\ndata: {data}\n\n".encode()
        self.framed = framed = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        for client in self.clients:
            client.offer(chunk, framed)


class Fanout:
    """The topics of one gateway, by subject; each made by its first client, dropped after
    its last one has been gone for `linger_s`."""

    def __init__(
        self, js: JetStreamContext, *, keepalive_s: float, linger_s: float, heartbeat_s: float
    ) -> None:
        """
        Args:
            js: the JetStream context the subscriptions are made with.
            keepalive_s: every client is sent a comment line this often (one timer for all
                clients, not one per client: 10,000 streams would keep 10,000 timers, each
                moved at every status).
            linger_s: how long a subject's subscription outlives its last client.
            heartbeat_s: the NATS server's idle heartbeat on each subscription; nats-py
                re-creates a consumer after two missed ones (a NATS restart).
        """
        self.js = js
        self.keepalive_s = keepalive_s
        self.linger_s = linger_s
        self.heartbeat_s = heartbeat_s
        self.topics: dict[str, Topic] = {}
        self.clients = 0
        self._drops: set[asyncio.Task] = set()
        self._ticker: asyncio.Task | None = None

    def join(self, subject: str, client: Client) -> Topic:
        """Add `client` to `subject`'s topic, making it (and starting its subscription) if new."""
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._keepalives(), name="sse keep-alives")
        topic = self.topics.get(subject)
        if topic is None:
            topic = self.topics[subject] = Topic(subject, self)
            topic.ready = asyncio.create_task(self._subscribe(topic), name=f"subscribe {subject}")
        elif topic.linger is not None:
            topic.linger.cancel()
            topic.linger = None
        topic.join(client)
        self.clients += 1
        return topic

    async def ready(self, topic: Topic) -> None:
        """Wait for `topic`'s subscription.

        Raises:
            nats.errors.Error, ConnectionError: it could not be made.
        """
        assert topic.ready is not None
        await asyncio.shield(topic.ready)

    def leave(self, topic: Topic, client: Client) -> None:
        """Remove `client`; the topic's last client going starts its linger."""
        topic.clients.discard(client)
        self.clients -= 1
        if topic.clients or self.topics.get(topic.subject) is not topic:
            return
        if self.linger_s > 0:
            topic.linger = asyncio.get_running_loop().call_later(self.linger_s, self._drop, topic)
        else:
            self._drop(topic)

    def end_all(self) -> None:
        """End every client's stream (the gateway is shutting down)."""
        for topic in self.topics.values():
            for client in topic.clients:
                client.end()

    async def close(self) -> None:
        """Close what streams are left (ended, but their sockets never took what was
        buffered), drop every topic now and wait until their consumers are gone."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for topic in list(self.topics.values()):
            for client in topic.clients:
                client.abort()
            if topic.linger is not None:
                topic.linger.cancel()
            self._drop(topic, force=True)
        while self._drops:
            await asyncio.gather(*self._drops, return_exceptions=True)

    async def _keepalives(self) -> None:
        while True:
            await asyncio.sleep(self.keepalive_s)
            for topic in self.topics.values():
                for client in topic.clients:
                    client.keepalive()

    async def _subscribe(self, topic: Topic):
        try:
            return await self.js.subscribe(
                topic.subject,
                stream=subjects.STATUS_STREAM,
                cb=topic.on_msg,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                idle_heartbeat=self.heartbeat_s,
            )
        except BaseException as exc:
            if self.topics.get(topic.subject) is topic:
                del self.topics[topic.subject]  # the next client tries again
            if isinstance(exc, nats.errors.Error | ConnectionError):
                log.warning(
                    "status_subscribe_failed", subject=topic.subject, error=type(exc).__name__
                )
            raise

    def _drop(self, topic: Topic, *, force: bool = False) -> None:
        """Forget `topic` and delete its consumer, unless a client came back (`force`: even
        then, at cleanup)."""
        topic.linger = None
        if (topic.clients and not force) or self.topics.get(topic.subject) is not topic:
            return
        del self.topics[topic.subject]
        task = asyncio.create_task(self._unsubscribe(topic), name=f"unsubscribe {topic.subject}")
        self._drops.add(task)
        task.add_done_callback(self._drops.discard)

    async def _unsubscribe(self, topic: Topic) -> None:
        """Stop the topic's push consumer and delete it, so it stops costing the server at once."""
        assert topic.ready is not None
        try:
            sub = await topic.ready
        except (nats.errors.Error, ConnectionError):
            return  # never subscribed
        try:
            await sub.unsubscribe()
        except nats.errors.Error as exc:
            log.debug("status_unsubscribe_failed", subject=topic.subject, error=type(exc).__name__)
            return
        consumer = getattr(
            sub, "_consumer", None
        )  # nats-py keeps the name here, and nowhere public
        if consumer:
            with contextlib.suppress(nats.errors.Error, ConnectionError):
                # The server deletes an ephemeral consumer with no interest after a few seconds.
                await self.js.delete_consumer(subjects.STATUS_STREAM, consumer)
        log.debug("status_topic_dropped", subject=topic.subject)
