"""A watch on the apps bucket: each later change to an app's spec, as it is written.

The gateway keeps its own watched cache (`dispatcher.gateway.specs`); a
handler process uses this one to drop an app from its spec memory
(`handlers.memo`) the moment its spec changes, so a publish reaches page
loads and heartbeats within the watch's delivery time (milliseconds), not
after `handlers.spec_cache_s`. A reconnect of the NATS client empties that
memory (changes may have been missed meanwhile); the time still bounds what
anything else the watch missed can leave behind.
"""

from collections.abc import Callable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy
from nats.js.kv import KeyValue

from handlers.state import app_name


async def watch_apps(kv: KeyValue, changed: Callable[[str], None]) -> Subscription:
    """Call `changed(app)` for each put, delete or purge of an app's spec from now on.

    Returns:
        The subscription (an ordered consumer, deliver policy "new"); unsubscribe it
        to stop.
    """

    async def on_msg(msg: Msg) -> None:
        changed(app_name(msg.subject[len(kv._pre) :]))

    return await kv._js.subscribe(
        f"{kv._pre}>",
        stream=kv._stream,
        cb=on_msg,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.NEW,
    )
