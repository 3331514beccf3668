"""Watches on KV buckets: each later write of the keys watched, as it is written.

The gateway keeps its own watched cache (`dispatcher.gateway.specs`); a
handler process watches two things:

- the apps bucket, to drop an app from its spec memory (`handlers.memo`) the
  moment its spec changes, so a publish reaches page loads and heartbeats
  within the watch's delivery time (milliseconds), not after
  `handlers.spec_cache_s`. A reconnect of the NATS client empties that memory
  (changes may have been missed meanwhile); the time still bounds what
  anything else the watch missed can leave behind.
- warm pools' records, so a claim or a refill starts from the record as it
  is now (`handlers.memo.Latest`): one compare-and-set, no read first. What
  the watch missed only costs a failed write and a read.
"""

from collections.abc import Callable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from handlers.state import app_name

Seen = Callable[[str, int, bytes | None], None]


async def watch_keys(kv: KeyValue, pattern: str, seen: Seen) -> Subscription:
    """Call `seen(key, revision, value)` for each write of a key matching `pattern` from now
    on; `value` is None for a delete or purge.

    Returns:
        The subscription (an ordered consumer, deliver policy "new"); unsubscribe it
        to stop.
    """

    async def on_msg(msg: Msg) -> None:
        operation = msg.headers.get(KV_OP) if msg.headers else None
        gone = operation in (KV_DEL, KV_PURGE) or not msg.data
        seen(msg.subject[len(kv._pre) :], msg.metadata.sequence.stream, None if gone else msg.data)

    return await kv._js.subscribe(
        f"{kv._pre}{pattern}",
        stream=kv._stream,
        cb=on_msg,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,
    )


async def watch_apps(kv: KeyValue, changed: Callable[[str], None]) -> Subscription:
    """Call `changed(app)` for each put, delete or purge of an app's spec from now on."""
    return await watch_keys(kv, ">", lambda key, _revision, _value: changed(app_name(key)))
