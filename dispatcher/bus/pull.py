"""Pull requests on a durable consumer whose messages are handed over as they arrive.

nats-py's `PullSubscription.fetch` awaits each message of a batch through
`Subscription.next_msg`, which makes two tasks and takes two or three turns
of the event loop per message. Alone, a handler process barely notices; on
a loop that also serves HTTP (`spinyard up`: 32 viewers' requests in every
turn) a turn takes milliseconds, and the handlers got a message per
consumer every few turns: 120-200 events/s handled while the gateway
accepted 400-670 (docs/benchmarks.md, "gateway"). Here the pull's answer
goes to a callback subscription, and nats-py's reader hands every message
that arrived together to the callback in one go: a batch costs a turn or
two, not two or three per message.

The messages of a pull are handed to `deliver` as they come, never held
back until the batch fills (issue 8's lesson: a message held by the client
waited up to a second); `pull` returns once the batch is delivered or the
server ends the request (nothing more waiting, or it expired).
"""

import asyncio
import json
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import StatusCode
from nats.js.errors import APIError

# Statuses that end a pull request without an error: no messages (no_wait), the
# request expired, or the server ended it (leader change, too many waiting requests).
_ENDED = (StatusCode.NO_MESSAGES, StatusCode.REQUEST_TIMEOUT, StatusCode.CONFLICT)
_ANSWER_MARGIN_S = 0.5  # how much later than its expiry a pull's end may arrive


class Puller:
    """Pull requests for one durable consumer, answered on an inbox of its own."""

    def __init__(
        self, js: JetStreamContext, stream: str, durable: str, deliver: Callable[[Msg], None]
    ) -> None:
        """
        Args:
            js: the JetStream context (its connection and API prefix are used).
            stream: the consumer's stream.
            durable: the consumer's name.
            deliver: called with each message as it arrives, on the event loop.
        """
        self._nc: Client = js._nc  # nats-py keeps both private; fetch() uses the same
        self._subject = f"{js._prefix}.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._deliver = deliver
        self._sub: Subscription | None = None
        self._inbox = ""
        self._asked = 0
        self._got = 0
        self._answer: asyncio.Future[None] | None = None
        self.num_pending = 0  # the stream's messages after the last one delivered

    async def start(self) -> None:
        self._inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(self._inbox, cb=self._arrived)

    async def stop(self) -> None:
        """Unsubscribe (before the connection drains, or drain waits on the inbox)."""
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def pull(self, batch: int, expires_s: float) -> int:
        """Ask for up to `batch` messages, the request expiring after
        `expires_s` seconds.

        Returns:
            How many of them were delivered (to `deliver`, as each arrived).

        Raises:
            TimeoutError: the server did not end the request in time.
            nats.js.errors.APIError: it refused it (ServiceUnavailableError: no leader).
        """
        loop = asyncio.get_running_loop()
        self._asked, self._got = batch, 0
        self._answer = answer = loop.create_future()
        request = {"batch": batch, "expires": int(expires_s * 1e9) - 100_000}
        await self._nc.publish(self._subject, json.dumps(request).encode(), reply=self._inbox)
        try:
            async with asyncio.timeout(expires_s + _ANSWER_MARGIN_S):
                await answer
        finally:
            self._answer = None
        return self._got

    async def _arrived(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        answer = self._answer
        if not status:
            self._got += 1
            self.num_pending = msg.metadata.num_pending
            self._deliver(msg)  # a message of an earlier, timed-out pull too: it is ours
            if answer is not None and not answer.done() and self._got >= self._asked:
                answer.set_result(None)
            return
        if answer is None or answer.done() or status == StatusCode.CONTROL_MESSAGE:
            return  # the end of an earlier pull, or a heartbeat (none is asked for)
        if status in _ENDED:
            answer.set_result(None)
            return
        try:
            APIError.from_msg(msg)  # raises the error the status stands for
        except APIError as exc:
            answer.set_exception(exc)
