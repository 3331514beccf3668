"""The handler registry: `@handler(kind, schema=..., on_failure=...)` and what it records.

A handler is an async function `fn(ctx, event)`. Its id names its durable
JetStream consumer, so every replica of the same handler shares the work.
Its failure hook, `hook(ctx, event, error)`, runs once when a message fails
for good, with the error as a page may read it (see `handlers.errors`). Its
start hook, `hook(ctx)`, runs once per process before its consumer fetches
anything (page_load's reconciles what a restart left, `handlers.reconcile`).
Tests build their own `Registry` and pass it to the runtime instead of the
default one.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from handlers.context import Context
from schemas import subjects
from schemas.errors import ErrorInfo

# The event argument is the handler's own `schema`; Any lets each handler name it.
HandlerFn = Callable[[Context, Any], Awaitable[None]]
FailureHook = Callable[[Context, Any, ErrorInfo], Awaitable[None]]
StartHook = Callable[[Context], Awaitable[object]]


@dataclass(frozen=True)
class HandlerSpec:
    """One registered handler and its delivery options."""

    id: str
    kind: str
    fn: HandlerFn
    schema: type[BaseModel]
    concurrency: int = 32
    retries: int = 3
    timeout_s: float = 60.0
    backoff_s: tuple[float, ...] = (0.5, 2.0, 10.0)
    on_failure: FailureHook | None = None
    on_start: StartHook | None = None
    patient: bool = False
    routine: bool = False

    @property
    def filter_subject(self) -> str:
        return subjects.kind_filter(self.kind)

    @property
    def tries(self) -> int:
        """Tries of a message before it is dead-lettered (unless its error says `until`)."""
        return self.retries + 1

    @property
    def max_deliver(self) -> int:
        """JetStream's limit of deliveries: one past the tries, so that the consumer
        sees (and dead-letters) the delivery after a last try that was never settled;
        none for a patient handler. (The consumer counts tries: dispatcher.bus.requeue.)"""
        return -1 if self.patient else self.tries + 1

    def backoff(self, attempt: int) -> float:
        """Delay before try `attempt + 1`, given `attempt` tries so far (1-based)."""
        return self.backoff_s[min(attempt, len(self.backoff_s)) - 1]


@dataclass
class Registry:
    """Handlers by id."""

    handlers: dict[str, HandlerSpec] = field(default_factory=dict)

    def add(self, spec: HandlerSpec) -> None:
        if spec.id in self.handlers:
            raise ValueError(f"handler {spec.id!r} is registered twice")
        self.handlers[spec.id] = spec

    def get(self, handler_id: str) -> HandlerSpec:
        try:
            return self.handlers[handler_id]
        except KeyError:
            known = ", ".join(sorted(self.handlers)) or "none"
            raise KeyError(f"no handler {handler_id!r}; known: {known}") from None

    def select(self, ids: list[str] | None) -> list[HandlerSpec]:
        """The named handlers, or all when `ids` is empty."""
        if not ids:
            return list(self.handlers.values())
        return [self.get(i) for i in ids]


default_registry = Registry()


def handler(
    kind: str,
    *,
    schema: type[BaseModel],
    id: str | None = None,
    concurrency: int = 32,
    retries: int = 3,
    timeout_s: float = 60.0,
    backoff_s: tuple[float, ...] = (0.5, 2.0, 10.0),
    on_failure: FailureHook | None = None,
    on_start: StartHook | None = None,
    patient: bool = False,
    routine: bool = False,
    registry: Registry | None = None,
) -> Callable[[HandlerFn], HandlerFn]:
    """Register `fn` as the handler of events of `kind`.

    Args:
        kind: the event kind (see `schemas.subjects.KINDS`).
        schema: the event model the message is decoded into.
        id: durable consumer name; defaults to `kind`.
        concurrency: messages handled at once per replica.
        retries: tries after the first before the message is dead-lettered.
        timeout_s: a try that runs longer is cancelled and counts as failed.
        backoff_s: delays before the 2nd, 3rd, ... try.
        on_failure: run once when a message fails for good (dead-lettered):
            `hook(ctx, event, error)`, e.g. to publish a `failed` status.
        on_start: run once per process before the consumer starts: `hook(ctx)`,
            e.g. to reconcile records with what the backend runs.
        patient: a `RetryableError` with `until` is tried past `retries`, until
            then (with the last backoff between tries); others still get `retries`.
        routine: a periodic handler (the reaper's tick): its messages that end `ok`
            are logged at debug, so an idle stack's log stays quiet.
        registry: where to register; the default registry otherwise.

    Returns:
        A decorator that registers the function and returns it unchanged
        (with its `HandlerSpec` as `fn.spec`).
    """

    def register(fn: HandlerFn) -> HandlerFn:
        spec = HandlerSpec(
            id=id or kind,
            kind=kind,
            fn=fn,
            schema=schema,
            concurrency=concurrency,
            retries=retries,
            timeout_s=timeout_s,
            backoff_s=backoff_s,
            on_failure=on_failure,
            on_start=on_start,
            patient=patient,
            routine=routine,
        )
        (registry or default_registry).add(spec)
        fn.spec = spec  # type: ignore[attr-defined]
        return fn

    return register
