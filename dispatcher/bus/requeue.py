"""Tries that a stop interrupted are not tries: the event goes back, its count kept.

JetStream counts every delivery, and a consumer's `max_deliver` cannot tell a
handler that failed from one that was stopped halfway (SIGTERM, a scale-down,
`spinyard up` ending). Were an interrupted delivery simply nak'ed, an event
caught by stops on its last tries would be dead-lettered as "exhausted"
though its handler never failed.

So the consumer counts tries itself: a delivery's try number is the tries
its earlier copies used (header `Spinyard-Tries-Used`, absent on a first
copy) plus JetStream's delivery count. An interrupted delivery is handed
back by publishing a copy of the event whose header counts only the tries
before this one, and then acking the original. The copy's message id is
derived from the original's stream sequence and the time it was stored
(the same on every delivery, and unique even if the stream is ever made
anew), so a process that dies between
the two steps and is interrupted again on the redelivery publishes nothing
twice (JetStream drops the copy within `nats.dedup_window_s`). When the copy
cannot be published (the bus is away), the delivery is nak'ed instead, as
before: it may then use up a try.

The consumer's `max_deliver` is one above the handler's tries. The extra
delivery is the one that follows a try whose process died (or stalled past
the ack wait): the consumer sees a try number past the handler's tries and
dead-letters the event without running it again.
"""

import asyncio
import contextlib

from nats.aio.msg import Msg
from nats.js import JetStreamContext

TRIES_USED = "Spinyard-Tries-Used"
PUBLISH_TIMEOUT_S = 2.0


def attempt(msg: Msg) -> int:
    """This delivery's try number (1-based), counting the tries of earlier copies."""
    used = 0
    if msg.headers:
        with contextlib.suppress(ValueError, TypeError):
            used = max(0, int(msg.headers.get(TRIES_USED, 0)))
    return used + msg.metadata.num_delivered


async def hand_back(js: JetStreamContext, msg: Msg, this_try: int) -> bool:
    """Return `msg`'s event to the stream without using up `this_try`; False if only nak'ed."""
    headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
    headers[TRIES_USED] = str(this_try - 1)
    stored_us = round(msg.metadata.timestamp.timestamp() * 1e6)  # with the sequence: unique
    headers["Nats-Msg-Id"] = f"requeued-{msg.metadata.sequence.stream}-{stored_us}"
    try:
        async with asyncio.timeout(PUBLISH_TIMEOUT_S):
            await js.publish(msg.subject, msg.data, headers=headers)
        await msg.ack()
        return True
    except Exception:
        with contextlib.suppress(Exception):
            await msg.nak()
        return False
