"""Status fan-out: one shared JetStream subscription per status subject, for all its SSE clients.

A lecture hall watches one app: a thousand browsers on one status subject.
Giving each its own JetStream consumer cost the server a consumer per
browser (creation refused past about a thousand of them) and the gateway
23 KB and a consumer round trip per stream. Here a `Topic` per subject holds
one ordered push consumer (deliver policy LAST_PER_SUBJECT, filtered on the
subject) that every client of that subject on this gateway shares, and the
last status it delivered, already framed as an SSE event; each client is a
`Client`, a few slots and its own small backlog.

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
- A slow client's backlog keeps the newest `QUEUE_SIZE` statuses (older ones
  are dropped): status is last-value, so it misses only stale states, and
  the fan-out never waits for any client.

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
END = object()  # what `Client.take` returns once the client is ended
KEEPALIVE = b": keepalive\n\n"


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


class Client:
    """One SSE stream's side of a topic: the statuses not yet written, newest `QUEUE_SIZE`,
    whether a keep-alive comment is due, and, once its headers are sent, its transport."""

    __slots__ = ("chunked", "ended", "pending", "ping", "transport", "waiter")

    def __init__(self) -> None:
        # A list, made when needed: a client mostly has nothing or one status waiting, and a
        # deque's first block alone is 600 bytes, a lot next to an SSE stream's ~10 KB.
        self.pending: list[bytes] | None = None
        self.waiter: asyncio.Future | None = None
        self.ended = False
        self.ping = False
        self.transport: asyncio.WriteTransport | None = None
        self.chunked = False

    def attach(self, transport: asyncio.WriteTransport | None, chunked: bool) -> None:
        """Let statuses be written straight to `transport` while the stream is idle (its
        headers are sent; `chunked`: the response uses HTTP/1.1 chunked encoding)."""
        self.transport, self.chunked = transport, chunked

    def offer(self, chunk: bytes, framed: bytes | None = None) -> None:
        """Send `chunk` (`framed`: the same as one HTTP chunk), or queue it, dropping the
        oldest when `QUEUE_SIZE` are waiting.

        A client parked in `wait()` with nothing queued and an empty write buffer is
        written to here, at once: 10,000 of them cost 10,000 socket writes, not also
        10,000 task wake-ups through aiohttp's writer. Anything else (headers not sent
        yet, the socket backed up, statuses already queued) queues, so order holds and a
        slow client never holds up the loop.
        """
        transport = self.transport
        if (
            transport is not None
            and self.waiter is not None
            and not self.pending
            and not transport.get_write_buffer_size()
            and not transport.is_closing()
        ):
            transport.write(framed if self.chunked and framed is not None else chunk)
            return
        pending = self.pending
        if pending is None:
            self.pending = [chunk]
        else:
            if len(pending) >= QUEUE_SIZE:
                del pending[0]
            pending.append(chunk)
        self._wake()

    def keepalive(self) -> None:
        """Ask for a keep-alive comment, unless a status is about to be written anyway."""
        if not self.pending:
            self.ping = True
            self._wake()

    def end(self) -> None:
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def take(self) -> bytes | object | None:
        """What to write next: a status, `KEEPALIVE`, `END` once ended, or None: `wait()`."""
        if self.ended:
            return END
        pending = self.pending
        if pending:
            chunk = pending.pop(0)
            if not pending:
                self.pending = None
            return chunk
        if self.ping:
            self.ping = False
            return KEEPALIVE
        return None

    def wait(self) -> asyncio.Future:
        """A future done when there is something to `take()` (awaited as is: no coroutine
        frame per waiting stream)."""
        self.waiter = waiter = asyncio.get_running_loop().create_future()
        return waiter


class Topic:
    """One status subject on this gateway: its shared subscription, last status and clients."""

    __slots__ = ("chunk", "clients", "framed", "linger", "ready", "seq", "subject")

    def __init__(self, subject: str) -> None:
        self.subject = subject
        self.clients: set[Client] = set()
        self.seq = 0  # stream sequence of the last status passed on
        self.chunk: bytes | None = None  # that status as an SSE event
        self.framed: bytes | None = None  # and as one HTTP chunk
        self.ready: asyncio.Task | None = None  # subscribing; its result is the subscription
        self.linger: asyncio.TimerHandle | None = None

    def join(self, client: Client) -> None:
        if self.chunk is not None:
            client.offer(self.chunk)
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
            topic = self.topics[subject] = Topic(subject)
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
        """Drop every topic now and wait until their consumers are gone."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for topic in list(self.topics.values()):
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
