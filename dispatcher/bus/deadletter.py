"""Dead letters: what one carries, and the watcher for events whose handler died on the last try.

A dead letter is the event's payload, published on `spinyard.v1.dead.<kind>`
with headers that say why (`headers()` below is the one place they are
written): the handler, the original subject, an error code, a reason for
operators and the number of tries.

When a handler's last try is never settled (its process died), the next
delivery, one past the handler's tries, is dead-lettered by the consumer loop
that receives it (`requeue` tells why there is one). Should that delivery be
lost too, JetStream stops redelivering and announces it with a
max-deliveries advisory; the consumer loop never sees the message again. Every handler
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
UNSETTLED = "the handler stopped (crashed or was killed) during its last try"


def headers(handler: str, subject: str, code: str, reason: str, attempts: int) -> dict[str, str]:
    """The headers of a dead letter (one line each: NATS headers cannot hold line breaks)."""
    return {
        "Spinyard-Handler": handler,
        "Spinyard-Subject": subject,
        "Spinyard-Error-Code": code,
        "Spinyard-Reason": reason.replace("\r", " ").replace("\n", " ")[:1000],
        "Spinyard-Attempts": str(attempts),
    }


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
    letter = {"Nats-Msg-Id": f"exhausted-{seq}"} | headers(
        consumer, stuck.subject, codes.INTERNAL, UNSETTLED, deliveries
    )
    await js.publish(subjects.dead(kind), stuck.data or b"", headers=letter)
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
