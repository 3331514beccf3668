"""Dead letters for messages whose handler died on the last try.

When a handler process crashes while handling a message's last delivery,
JetStream stops redelivering it and announces that with a max-deliveries
advisory; the consumer loop never sees the message again. Every handler
process listens for those advisories, copies the stuck event to the dead
letter subject (de-duplicated by stream sequence, so many replicas make one
copy) and removes it from the events stream.
"""

import asyncio
import json

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from dispatcher import logs
from schemas import errors as codes
from schemas import subjects

ADVISORY = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{subjects.EVENTS_STREAM}.*"
log = logs.get("spinyard.advisories")


async def dead_letter_exhausted(nc: Client, js: JetStreamContext, stopping: asyncio.Event) -> None:
    """Until `stopping`: dead-letter each event JetStream gave up redelivering."""
    sub = await nc.subscribe(ADVISORY)
    try:
        while not stopping.is_set():
            try:
                msg = await sub.next_msg(timeout=1.0)
            except TimeoutError:
                continue
            try:
                advisory = json.loads(msg.data)
                await _dead_letter(
                    js,
                    advisory["consumer"],
                    int(advisory["stream_seq"]),
                    int(advisory.get("deliveries", 0)),
                )
            except Exception as exc:  # a bad advisory must not stop the service
                log.error("advisory_not_handled", error=repr(exc))
    finally:
        await sub.unsubscribe()


async def _dead_letter(js: JetStreamContext, consumer: str, seq: int, deliveries: int) -> None:
    try:
        stuck = await js.get_msg(subjects.EVENTS_STREAM, seq)
    except NotFoundError:
        return  # another replica got there first
    kind = stuck.subject.split(".")[3] if stuck.subject.count(".") >= 3 else consumer
    headers = {
        "Nats-Msg-Id": f"exhausted-{seq}",
        "Spinyard-Handler": consumer,
        "Spinyard-Subject": stuck.subject,
        "Spinyard-Error-Code": codes.INTERNAL,
        "Spinyard-Reason": "the handler stopped (crashed or was killed) during its last try",
        "Spinyard-Attempts": str(deliveries),
    }
    await js.publish(subjects.dead(kind), stuck.data or b"", headers=headers)
    try:
        await js.delete_msg(subjects.EVENTS_STREAM, seq)
    except NotFoundError:
        pass
    log.warning(
        "message_dead_lettered",
        handler=consumer,
        subject=stuck.subject,
        seq=seq,
        reason="exhausted",
    )
