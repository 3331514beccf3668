"""What one handler process remembers between messages, to spare the bus reads and writes.

Three things, all bounded (the oldest entry goes first):

- App specs, for `spec_ttl_s` after they were read (`handlers.spec_cache_s`;
  0 turns it off). page_load and heartbeat read the app's spec for every
  event; a warm crowd of one app then reads the same spec thousands of times
  a second. The runtime drops an app from it as soon as a watch on the apps
  bucket sees its spec change (`forget`), so a changed spec reaches page
  loads and heartbeats within milliseconds; a reconnect empties it
  (`epoch`), and `spec_ttl_s` bounds what the watch missed otherwise. An app
  not found is not remembered (it may be registered a moment later). A run
  request reads the spec beside its create and checks the remembered one
  against it; a run's start uses a remembered spec only if it is the
  revision the run records.
- When this process last wrote each activity key (`handlers.activity_write_s`).
  A key written less than `activity_every_s` ago is not written again: its
  value would move by less than that, which no idle limit can tell
  (`handlers.activity`). The write that is skipped is always one that came
  after a write that had finished.
- The newest revision of records of one kind this process saw (`Latest`):
  the first guess of a compare-and-set, never its judge (issue 8's
  stale-read lesson, docs/deploy-kubernetes.md): a guess that is behind
  makes the write fail, and the change reads the record and decides again.
"""

import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

V = TypeVar("V")
SIZE = 4096  # entries each part keeps at most


class Bounded(Generic[V]):
    """A dict of at most `size` entries; setting a key makes it the newest, the oldest goes."""

    def __init__(self, size: int = SIZE) -> None:
        self.size = size
        self._entries: dict[str, V] = {}

    def get(self, key: str) -> V | None:
        return self._entries.get(key)

    def set(self, key: str, value: V) -> None:
        entries = self._entries
        entries.pop(key, None)
        if len(entries) >= self.size:
            del entries[next(iter(entries))]
        entries[key] = value

    def pop(self, key: str) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)


class Memo:
    """A handler process's memory of app specs and of its own activity writes."""

    def __init__(
        self,
        spec_ttl_s: float = 0.0,
        activity_every_s: float = 0.0,
        size: int = SIZE,
        epoch: Callable[[], int] = lambda: 0,
    ) -> None:
        """
        Args:
            spec_ttl_s: how long a spec read is used again; 0: read every time.
            activity_every_s: an activity key this process wrote less than this long
                ago is not written again; 0: write every time.
            size: entries each part keeps at most.
            epoch: a number that changes when changes may have been missed (the NATS
                client's reconnect count: the watch that calls `forget` was away); every
                spec remembered before it changed is forgotten.
        """
        self.spec_ttl_s = spec_ttl_s
        self.activity_every_s = activity_every_s
        self._specs: Bounded[tuple[float, object]] = Bounded(size)
        self._written: Bounded[float] = Bounded(size)
        self._epoch, self._seen_epoch = epoch, epoch()

    async def spec(self, name: str, read: Callable[[str], Awaitable[V | None]]) -> V | None:
        """`name`'s spec: remembered if read less than `spec_ttl_s` ago, else `read(name)`."""
        hit = self.remembered(name)
        if hit is not None:
            return hit  # type: ignore[return-value]
        asked = time.monotonic()
        value = await read(name)
        if value is not None:
            self.remember(name, value, asked)
        return value

    def remember(self, name: str, value: object, at: float | None = None) -> None:
        """Keep `value`, read at `at` (monotonic; default now), as `name`'s spec (if specs
        are remembered at all)."""
        if self.spec_ttl_s > 0:
            self._specs.set(name, (time.monotonic() if at is None else at, value))

    def remembered(self, name: str) -> object | None:
        """`name`'s spec if it was read less than `spec_ttl_s` ago (no read: None if not).
        A new epoch forgets every spec first."""
        if self.spec_ttl_s <= 0:
            return None
        if (epoch := self._epoch()) != self._seen_epoch:
            self._seen_epoch = epoch
            self._specs = Bounded(self._specs.size)
            return None
        hit = self._specs.get(name)
        return hit[1] if hit is not None and time.monotonic() - hit[0] < self.spec_ttl_s else None

    def forget(self, name: str) -> None:
        """Drop `name`'s spec: it changed, and the next event reads it again."""
        self._specs.pop(name)

    def written_recently(self, key: str, now: float) -> bool:
        """Whether this process finished writing activity key `key` less than the limit ago."""
        last = self._written.get(key)
        return last is not None and 0 <= now - last < self.activity_every_s

    def wrote(self, key: str, at: float) -> None:
        """Note that a write of activity key `key`, stamped `at`, has finished."""
        if self.activity_every_s > 0:
            self._written.set(key, at)


class Latest:
    """The newest revision of each record of one kind that this process saw, encoded.

    Fed by a watch on the records' keys (`dispatcher.bus.watch`) and by the
    process's own reads and writes (`handlers.state.Records`), it is a change's
    first guess: if nobody wrote the record since, the change is one write,
    not a read and a write. A guess that is behind costs a failed write and a
    read (the compare-and-set decides, never this). A deletion is kept as
    its revision, so a late copy of an older value is not taken for news.
    """

    def __init__(self, size: int = SIZE) -> None:
        self._entries: Bounded[tuple[int, bytes | None]] = Bounded(size)

    def saw(self, key: str, revision: int, data: bytes | None) -> None:
        """`key` was at `revision` with `data` (None: deleted), unless we know a newer one."""
        held = self._entries.get(key)
        if held is None or held[0] < revision:
            self._entries.set(key, (revision, data))

    def get(self, key: str) -> tuple[int, bytes] | None:
        """The newest revision and value seen of `key`, if it was not deleted then."""
        held = self._entries.get(key)
        return None if held is None or held[1] is None else (held[0], held[1])
