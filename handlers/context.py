"""The `ctx` every handler receives: KV state, backend, store, publisher, logger.

It is built once per handler process by the runtime and re-bound per message
with that message's log context. Nothing in it holds per-message state; its
`memo` is the process's bounded memory of app specs and activity writes
(`handlers.memo`), off unless the runtime turns it on.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from nats.js import JetStreamContext
from pydantic import BaseModel
from structlog.typing import FilteringBoundLogger

from handlers.memo import Memo
from handlers.ports import Backend, ObjectStore
from handlers.state import State
from schemas.codec import encode


class LazyLog:
    """A logger bound to `values` when first used: most messages' handlers log nothing,
    and binding costs more than this wrapper (a warm page load, a heartbeat)."""

    __slots__ = ("_base", "_bound", "_values")

    def __init__(self, base: FilteringBoundLogger, values: dict[str, Any]) -> None:
        self._base, self._values, self._bound = base, values, None

    def __getattr__(self, name: str) -> Any:
        if self._bound is None:
            self._bound = self._base.bind(**self._values)
        return getattr(self._bound, name)


@dataclass(frozen=True)
class Knobs:
    """Handler behaviour that operators tune (from `dispatcher.settings`)."""

    pool_refill_per_tick: int = 1
    reconcile_grace_s: float = 30.0
    run_slots: int = 0  # runs of all apps at once; 0: no total limit
    max_concurrent_starts: int = 64  # viz instance starts at once; 0: no limit


@dataclass(frozen=True)
class Context:
    """What a handler may use: nothing else reaches NATS, the backend or the store."""

    state: State
    backend: Backend
    js: JetStreamContext
    log: FilteringBoundLogger
    knobs: Knobs = field(default_factory=Knobs)
    store: ObjectStore | None = None  # None where no handler that runs needs results
    now: Callable[[], float] = time.time
    memo: Memo = field(default_factory=Memo)

    def bind(self, **values: Any) -> "Context":
        """A copy whose logger carries `values` (bound when it first logs)."""
        return replace(self, log=LazyLog(self.log, values))

    async def publish_status(self, subject: str, status: BaseModel) -> None:
        """Publish a status message; the status stream keeps the last one per subject."""
        await self.js.publish(subject, encode(status))

    async def emit(self, subject: str, event: BaseModel, msg_id: str | None = None) -> None:
        """Publish an event for another handler, de-duplicated by its id."""
        headers = {"Nats-Msg-Id": msg_id or event.id}  # type: ignore[attr-defined]
        await self.js.publish(subject, encode(event), headers=headers)
