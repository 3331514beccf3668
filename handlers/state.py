"""Typed, compare-and-set access to the records handlers keep in JetStream KV.

Handlers hold no state between messages: each decision is read from here
and written back with the revision it was read at, so concurrent replicas
never both win. Each kind of record has one accessor, typed to its model and
keyed by the record's own id (the KV layout is below; the gateway reads it
too, so it does not change lightly):

- `state.apps`:        app name -> AppSpec; bucket apps, key `owner.title`
- `state.deployments`: slot key -> `deployments.Deployment`; bucket deployments,
                       keys `owner.title.shared`, `owner.title.session.<sid>`
- `state.pools`:       app name -> `pools.PoolIndex`; bucket deployments,
                       key `owner.title.pool`
- `state.jobs`:        job id -> `jobs.Job`; bucket jobs, key `<job_id>`
- `state.queues`:      app name -> `runq.RunQueue`; bucket jobs, key `queue.owner.title`
- `state.slots`:       the one `runq.Slots` (any id); bucket jobs, key `queue-slots`
- `state.gates`:       gate key -> `gates.Gate`; bucket jobs, keys `queue-viz.starts`,
                       `queue-viz.app.owner.title`, `queue-viz.session.<sid>`
- `state.activity`:    activity key -> `activity.Mark`; bucket activity, keys
                       `<slot key>.page_load`, `<slot key>.heartbeat` (handlers
                       only: the gateway does not open it)
- `state.revisions`:   app name -> `revisions.History`; bucket revisions, key
                       `owner.title` (written by the gateway's publish routes)

The records and their operations live in `deployments`, `pools`, `jobs`, `activity`,
`gates` and `revisions`;
this module only reads and writes them.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import structlog
from nats.js.api import DeliverPolicy
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue
from pydantic import BaseModel, ValidationError

from handlers import pools
from handlers.activity import Mark
from handlers.deployments import Deployment
from handlers.errors import RetryableError
from handlers.gates import Gate
from handlers.jobs import Job
from handlers.memo import Latest
from handlers.pools import PoolIndex
from handlers.revisions import History
from handlers.runq import RunQueue, Slots
from schemas import codec, subjects
from schemas.spec import AppSpec

M = TypeVar("M", bound=BaseModel)

SCAN_TIMEOUT_S = 5.0
log = structlog.get_logger("spinyard.state")


def _same(key: str) -> str:
    return key


def app_name(key: str) -> str:
    """The app name `owner/title` of its KV key `owner.title`."""
    return key.replace(".", "/", 1)


@dataclass(frozen=True)
class Entry(Generic[M]):
    """A record as read: its id, value and the revision to compare-and-set against."""

    key: str
    value: M
    revision: int


@dataclass
class Turn(Generic[M]):
    """The changes of one record in this process, one at a time (`Records.turn`)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    # What the last change wrote (revision, encoded value), while others wait their turn:
    # bytes, so each change decodes a value of its own to change (`Records.guess`).
    last: tuple[int, bytes] | None = None


def newest(*entries: Entry[M] | None) -> Entry[M] | None:
    """The entry of the highest revision among those given, if any."""
    return max((e for e in entries if e is not None), key=lambda e: e.revision, default=None)


class Records(Generic[M]):
    """Typed compare-and-set access to one kind of record in one KV bucket.

    Records are addressed by their own id (an app name, a job id); `key` maps
    it to the KV key and `id` back. `keep` picks this kind's keys out of a
    bucket that holds two kinds (deployments and pools share one).
    """

    def __init__(
        self,
        kv: KeyValue,
        model: type[M],
        *,
        key: Callable[[str], str] = _same,
        id: Callable[[str], str] = _same,
        keep: Callable[[str], bool] = lambda key: True,
    ) -> None:
        self.kv = kv
        self.model = model
        self._key, self._id, self._keep = key, id, keep
        self._turns: dict[str, Turn[M]] = {}
        # What this process saw written, if a watch keeps it current (`heard`).
        self.latest: Latest | None = None

    def heard(self, key: str, revision: int, data: bytes | None) -> None:
        """A watch saw `key` written at `revision` (`data` None: deleted); kept in `latest`
        as the next change's first guess. Keys of another kind are ignored."""
        if self.latest is not None and self._keep(key):
            self.latest.saw(key, revision, data)

    def _seen(self, id: str) -> Entry[M] | None:
        """The newest value of the record this process saw (`latest`): unread, maybe stale."""
        held = self.latest.get(self._key(id)) if self.latest is not None else None
        return Entry(id, codec.decode(self.model, held[1]), held[0]) if held else None

    @contextlib.asynccontextmanager
    async def turn(self, id: str) -> AsyncIterator[Turn[M]]:
        """Wait for this process's turn to change the record.

        Concurrent changes of one record (a burst of runs on one app's queue)
        would otherwise race: every loser of a compare-and-set pays a read and a
        write and tries again, and a burst of fifty took seconds that way. In
        turns, only other replicas' writes conflict, and each change starts from
        what the one before it wrote (`Turn.last`), so a hot record costs one
        write per change. A turn is forgotten once nobody waits for it.
        """
        turn: Turn[M] | None = self._turns.get(id)
        if turn is None:
            turn = self._turns[id] = Turn()
        turn.users += 1
        try:
            async with turn.lock:
                yield turn
        finally:
            turn.users -= 1
            if not turn.users:
                del self._turns[id]

    async def read(self, id: str) -> Entry[M] | None:
        """The current value and revision, or None if absent or deleted."""
        try:
            entry = await self.kv.get(self._key(id))
        except KeyNotFoundError:
            return None
        if self.latest is not None:
            self.latest.saw(entry.key, entry.revision, entry.value or None)
        if entry.operation in (KV_DEL, KV_PURGE) or entry.value is None:
            return None
        value = codec.decode(self.model, entry.value)
        return Entry(id, value, entry.revision)

    async def get(self, id: str) -> M | None:
        """The current value, or None if absent or deleted."""
        entry = await self.read(id)
        return entry.value if entry else None

    async def create(self, id: str, value: M) -> int | None:
        """Write `value` only if the record is absent. The revision, or None if it exists."""
        return await self._write(id, value, None)

    async def update(self, id: str, value: M, revision: int) -> int | None:
        """Write `value` only if the record is still at `revision`. None on conflict."""
        return await self._write(id, value, revision)

    async def _write(self, id: str, value: M, revision: int | None) -> int | None:
        """Write `value` at `revision` (None: absent, or deleted); None on conflict."""
        key, data = self._key(id), codec.encode(value)
        try:
            if revision is None:
                written = await self.kv.create(key, data)
            else:
                written = await self.kv.update(key, data, last=revision)
        except KeyWrongLastSequenceError:
            return None
        if self.latest is not None:
            self.latest.saw(key, written, data)
        return written

    async def put(self, id: str, value: M) -> int:
        """Write `value` whatever is there (for records one writer owns, like app specs)."""
        return await self.kv.put(self._key(id), codec.encode(value))

    def guess(self, id: str, turn: Turn[M]) -> Entry[M] | None:
        """What the change before ours in `turn` wrote, a value of our own: unread, so
        another replica may have changed the record since."""
        if turn.last is None:
            return None
        revision, data = turn.last
        return Entry(id, codec.decode(self.model, data), revision)

    def remember(self, turn: Turn[M], value: M, revision: int) -> None:
        """Note what a change in `turn` wrote, for the next one's `guess`."""
        turn.last = (revision, codec.encode(value))

    async def change(
        self,
        id: str,
        change: Callable[[M], M | None],
        *,
        default: Callable[[], M] | None = None,
        known: Entry[M] | None = None,
    ) -> Entry[M] | None:
        """Read, apply `change`, write back at the revision read; re-read on conflict.

        Changes of one record in this process take turns (`turn`).

        Args:
            id: the record.
            change: returns the new value, or None to leave the record alone.
            default: makes a first value for a missing record (then it is
                created); without it a missing record is left alone.
            known: the record as the caller last read or wrote it, tried first
                in place of a read: if nobody changed it since, one write.

        Returns:
            What was written, or None if nothing was.

        Raises:
            RetryableError: the record kept changing for every try.
        """
        async with self.turn(id) as turn:
            guess = newest(known, self.guess(id, turn), self._seen(id))  # unread: maybe stale
            async for _ in cas_loop():
                entry = guess or await self.read(id)
                if entry is None and default is None:
                    return None
                new = change(entry.value if entry else default())
                if new is None and guess is not None:  # decided on the guess: read, decide again
                    entry = await self.read(id)
                    if entry is None and default is None:
                        return None
                    new = change(entry.value if entry else default())
                guess = turn.last = None
                if new is None:
                    return None
                if entry is None:
                    rev = await self.create(id, new)
                else:
                    rev = await self.update(id, new, entry.revision)
                if rev is not None:
                    self.remember(turn, new, rev)
                    return Entry(id, new, rev)
        raise RetryableError(f"{self._key(id)} kept changing under us", delay=0.2)

    async def delete(self, id: str, revision: int | None = None) -> bool:
        """Delete the record (only at `revision`, if given). False on conflict."""
        try:
            await self.kv.delete(self._key(id), last=revision)
        except KeyWrongLastSequenceError:
            return False
        except Exception as exc:  # nats-py raises APIError for the wrong-sequence case on delete
            if getattr(exc, "err_code", None) in (10071, 10164):
                return False
            raise
        return True

    async def scan(self, pattern: str = ">") -> list[Entry[M]]:
        """Every live record whose KV key matches `pattern`.

        It reads the last message per key with an ordered consumer until the
        server reports nothing pending. (nats-py's KV watcher can signal "initial
        values done" before it has delivered them all; a reaper trusting it once
        saw half the apps and stopped the rest as removed.)
        """
        kv, js = self.kv, self.kv._js
        if pattern == ">":
            info = await js.stream_info(kv._stream)
            if info.state.messages == 0:
                return []
        else:  # a pattern that matches no key would wait SCAN_TIMEOUT_S for its first message
            info = await js.stream_info(kv._stream, subjects_filter=f"{kv._pre}{pattern}")
            if not info.state.subjects:
                return []
        sub = await js.subscribe(
            f"{kv._pre}{pattern}",
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        )
        found: dict[str, tuple[bytes, int]] = {}
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
                elif self._keep(key):
                    found[key] = (msg.data, msg.metadata.sequence.stream)
                if msg.metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
        entries = []
        for key, (data, rev) in found.items():
            try:
                entries.append(Entry(self._id(key), codec.decode(self.model, data), rev))
            except (codec.DecodeError, ValidationError) as exc:
                # One record this version cannot read (written by an older one, say) must
                # not stop every pass over the rest: skip it, and say so.
                log.warning("record_unreadable", bucket=kv._stream, key=key, error=str(exc)[:300])
        return entries


class State:
    """spinyard's KV state: one typed accessor per kind of record."""

    def __init__(
        self,
        apps: KeyValue,
        deployments: KeyValue,
        jobs: KeyValue,
        activity: KeyValue | None = None,
        revisions: KeyValue | None = None,
    ):
        self.apps = Records(apps, AppSpec, key=subjects.app_key, id=app_name)
        self.deployments = Records(
            deployments, Deployment, keep=lambda key: not pools.is_pool_key(key)
        )
        self.pools = Records(
            deployments,
            PoolIndex,
            key=pools.pool_key,
            id=lambda key: app_name(key.rsplit(".", 1)[0]),
            keep=pools.is_pool_key,
        )
        self.jobs = Records(jobs, Job, keep=lambda key: not subjects.is_queue_key(key))
        self.queues = Records(
            jobs,
            RunQueue,
            key=subjects.run_queue_key,
            id=lambda key: app_name(key.removeprefix("queue.")),
            keep=lambda key: key.startswith("queue."),
        )
        self.slots = Records(jobs, Slots, key=lambda _: subjects.RUN_SLOTS_KEY)
        self.gates = Records(
            jobs, Gate, keep=lambda key: key.startswith(f"{subjects.VIZ_GATE_PREFIX}.")
        )
        # None in the gateway, which neither reads nor writes activity.
        self.activity = Records(activity, Mark) if activity is not None else None
        # None only where the bucket was not opened (tests building a State by hand).
        self.revisions = (
            Records(revisions, History, key=subjects.app_key, id=app_name)
            if revisions is not None
            else None
        )

    @classmethod
    def of(cls, buckets: dict[str, KeyValue]) -> "State":
        """The state over buckets opened by name (see `schemas.subjects.BUCKETS`)."""
        return cls(
            buckets[subjects.APPS_BUCKET],
            buckets[subjects.DEPLOYMENTS_BUCKET],
            buckets[subjects.JOBS_BUCKET],
            buckets.get(subjects.ACTIVITY_BUCKET),
            buckets.get(subjects.REVISIONS_BUCKET),
        )


async def cas_loop(attempts: int = 20) -> AsyncIterator[int]:
    """Yield try numbers for a compare-and-set loop, with a tiny jittered pause between tries."""
    for i in range(attempts):
        yield i
        await asyncio.sleep(0.001 * (i + 1))
