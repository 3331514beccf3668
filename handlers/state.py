"""Records handlers keep in JetStream KV, and compare-and-set access to them.

Handlers hold no state between messages: each decision is read from here
and written back with the revision it was read at, so concurrent replicas
never both win. Keys:

- apps:         `owner.title` -> AppSpec
- deployments:  `owner.title.shared`, `owner.title.session.<sid>` -> Deployment;
                `owner.title.pool` -> PoolIndex
- jobs:         `<job_id>` -> job record; `idem.<hash>` -> job id
"""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgpack
from nats.js.api import DeliverPolicy
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue
from pydantic import BaseModel, Field

from handlers.errors import RetryableError
from schemas import subjects
from schemas.errors import ErrorInfo
from schemas.spec import AppSpec
from schemas.status import AppState, Phases

M = TypeVar("M", bound=BaseModel)

SHARED = "shared"
SCAN_TIMEOUT_S = 5.0
POOL = "pool"


class Deployment(BaseModel):
    """A viz instance serving a slot: the shared slot, or one session's."""

    app: str
    slot: str
    instance: str
    state: AppState
    url: str | None = None
    event_id: str = Field(description="The page load that created it; its redelivery resumes it")
    created_at: float
    last_page_load: float
    last_heartbeat: float | None = None
    phases: Phases = Field(default_factory=Phases)
    error: ErrorInfo | None = None
    session: str | None = None


class PoolMember(BaseModel):
    instance: str
    url: str
    created_at: float
    ready_at: float


class PoolIndex(BaseModel):
    """An app's warm pool: ready instances, and those still starting."""

    warm: list[PoolMember] = Field(default_factory=list)
    starting: dict[str, float] = Field(default_factory=dict, description="instance -> start time")

    def size(self) -> int:
        return len(self.warm) + len(self.starting)


def slot_key(app: str, slot: str) -> str:
    return f"{subjects.app_key(app)}.{slot}"


def session_slot(session: str) -> str:
    return f"session.{session}"


@dataclass
class Entry(Generic[M]):
    key: str
    value: M
    revision: int


def _pack(model: BaseModel) -> bytes:
    return msgpack.packb(model.model_dump(mode="json"), use_bin_type=True)


class State:
    """Typed, compare-and-set access to spinyard's KV buckets."""

    def __init__(self, apps: KeyValue, deployments: KeyValue, jobs: KeyValue):
        self._js = apps._js
        self.apps = apps
        self.deployments = deployments
        self.jobs = jobs

    @classmethod
    def of(cls, buckets: dict[str, KeyValue]) -> "State":
        """The state over buckets opened by name (see `schemas.subjects.BUCKETS`)."""
        return cls(
            buckets[subjects.APPS_BUCKET],
            buckets[subjects.DEPLOYMENTS_BUCKET],
            buckets[subjects.JOBS_BUCKET],
        )

    async def read(self, kv: KeyValue, key: str, model: type[M]) -> Entry[M] | None:
        """The current value and revision, or None if absent or deleted."""
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return None
        if entry.operation in (KV_DEL, KV_PURGE) or entry.value is None:
            return None
        return Entry(key, model.model_validate(msgpack.unpackb(entry.value)), entry.revision)

    async def create(self, kv: KeyValue, key: str, value: BaseModel) -> int | None:
        """Write `value` only if `key` is absent. Returns the revision, or None if it exists."""
        try:
            return await kv.create(key, _pack(value))
        except KeyWrongLastSequenceError:
            return None

    async def update(self, kv: KeyValue, key: str, value: BaseModel, revision: int) -> int | None:
        """Write `value` only if `key` is still at `revision`. None on conflict."""
        try:
            return await kv.update(key, _pack(value), last=revision)
        except KeyWrongLastSequenceError:
            return None

    async def change(
        self,
        kv: KeyValue,
        key: str,
        model: type[M],
        change: Callable[[M], M | None],
        *,
        default: Callable[[], M] | None = None,
    ) -> Entry[M] | None:
        """Read, apply `change`, write back at the revision read; re-read on conflict.

        `change` returns the new value, or None to leave the record alone. A
        missing record is left alone too, unless `default` makes a first value
        (then it is created).

        Returns:
            What was written, or None if nothing was.

        Raises:
            RetryableError: the record kept changing for every try.
        """
        async for _ in cas_loop():
            entry = await self.read(kv, key, model)
            if entry is None and default is None:
                return None
            new = change(entry.value if entry else default())
            if new is None:
                return None
            if entry is None:
                rev = await self.create(kv, key, new)
            else:
                rev = await self.update(kv, key, new, entry.revision)
            if rev is not None:
                return Entry(key, new, rev)
        raise RetryableError(f"{key} kept changing under us", delay=0.2)

    async def put(self, kv: KeyValue, key: str, value: BaseModel) -> int:
        return await kv.put(key, _pack(value))

    async def delete(self, kv: KeyValue, key: str, revision: int | None = None) -> bool:
        """Delete `key` (only at `revision`, if given). False on conflict."""
        try:
            await kv.delete(key, last=revision)
        except KeyWrongLastSequenceError:
            return False
        except Exception as exc:  # nats-py raises APIError for the wrong-sequence case on delete
            if getattr(exc, "err_code", None) in (10071, 10164):
                return False
            raise
        return True

    async def scan(self, kv: KeyValue, pattern: str = ">") -> list[tuple[str, Any, int]]:
        """Every live key matching `pattern`, with its raw decoded value and revision.

        It reads the last message per key with an ordered consumer until the
        server reports nothing pending. (nats-py's KV watcher can signal "initial
        values done" before it has delivered them all; a reaper trusting it once
        saw half the apps and stopped the rest as removed.)
        """
        info = await self._js.stream_info(kv._stream)
        if info.state.messages == 0:
            return []
        sub = await self._js.subscribe(
            f"{kv._pre}{pattern}",
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        )
        found: dict[str, tuple[Any, int]] = {}
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=SCAN_TIMEOUT_S)
                except TimeoutError:
                    if pattern == ">":
                        raise  # the stream has messages, so one must come
                    break  # nothing matches the pattern
                key = msg.subject[len(kv._pre) :]
                operation = msg.headers.get(KV_OP) if msg.headers else None
                if operation in (KV_DEL, KV_PURGE) or not msg.data:
                    found.pop(key, None)
                else:
                    found[key] = (msgpack.unpackb(msg.data), msg.metadata.sequence.stream)
                if msg.metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
        return [(k, v, r) for k, (v, r) in found.items()]

    async def get_app(self, name: str) -> AppSpec | None:
        entry = await self.read(self.apps, subjects.app_key(name), AppSpec)
        return entry.value if entry else None

    async def list_apps(self) -> list[AppSpec]:
        return [AppSpec.model_validate(v) for _, v, _ in await self.scan(self.apps)]

    async def put_app(self, spec: AppSpec) -> None:
        await self.put(self.apps, subjects.app_key(spec.name), spec)

    async def delete_app(self, name: str) -> bool:
        if await self.get_app(name) is None:
            return False
        await self.apps.delete(subjects.app_key(name))
        return True


async def cas_loop(attempts: int = 20) -> Any:
    """Yield try numbers for a compare-and-set loop, with a tiny jittered pause between tries."""
    for i in range(attempts):
        yield i
        await asyncio.sleep(0.001 * (i + 1))
