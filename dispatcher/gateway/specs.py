"""App specs as the gateway reads them: from memory, kept fresh by a watch on the apps bucket.

Every event and status request needs its app's spec (does it exist, what
kind, which origins may embed it). Reading the KV bucket for each would put
a NATS round trip on every request, so the gateway keeps the specs it has
read in a bounded LRU, and one ordered consumer on the apps bucket (deliver
policy "new") applies every later put, delete or purge to it as it arrives:
a changed or removed app takes effect within the watch's delivery time
(milliseconds). A spec is only ever replaced by a newer revision, so a read
racing a change cannot put an older value back.

Staleness is bounded however the watch fares: no entry is used more than
`max_age_s` after it was read or last confirmed by the watch (then it is
read again), and a reconnect of the NATS client empties the cache (updates
may have been missed while it was away). Unknown apps are cached too
(as None), so a flood of requests naming no app does not reach the bucket.
"""

import time
from collections import OrderedDict

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import DeliverPolicy
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE
from pydantic import ValidationError

from dispatcher import logs
from handlers.state import Records, app_name
from schemas import codec
from schemas.spec import AppSpec

log = logs.get("spinyard.gateway")

# (revision, spec or None, monotonic time it was read or confirmed)
_Cached = tuple[int, AppSpec | None, float]


class SpecCache:
    """Bounded, watched cache of `AppSpec`s by app name (`None`: no such app)."""

    def __init__(self, apps: Records[AppSpec], *, size: int, max_age_s: float) -> None:
        """
        Args:
            apps: the apps records (KV bucket `apps`).
            size: the most apps kept; the least recently used is dropped first. 0: no cache
                (every lookup reads the bucket).
            max_age_s: the longest an entry is used without being read again.
        """
        self.apps, self.size, self.max_age_s = apps, size, max_age_s
        self._entries: OrderedDict[str, _Cached] = OrderedDict()
        self._sub: Subscription | None = None
        self._reconnects = 0
        self.reads = 0  # bucket reads so far

    async def start(self) -> None:
        """Subscribe to the bucket's changes; before any lookup, so none is missed."""
        if self.size == 0:
            return
        kv = self.apps.kv
        self._reconnects = self._client_reconnects()
        self._sub = await kv._js.subscribe(
            f"{kv._pre}>",
            stream=kv._stream,
            cb=self._on_change,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
        )

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()

    async def get(self, app: str) -> AppSpec | None:
        """The spec of `app`, or None if there is no such app.

        Raises:
            nats.errors.Error: it had to read the bucket, and NATS did not answer.
        """
        if self.size:
            if self._client_reconnects() != self._reconnects:
                self._reconnects = self._client_reconnects()
                self._entries.clear()  # changes may have been missed while disconnected
            cached = self._entries.get(app)
            if cached is not None and time.monotonic() - cached[2] < self.max_age_s:
                self._entries.move_to_end(app)
                return cached[1]
        self.reads += 1
        entry = await self.apps.read(app)
        spec = entry.value if entry is not None else None
        self._store(app, entry.revision if entry is not None else 0, spec, refresh=True)
        return spec

    def _store(self, app: str, revision: int, spec: AppSpec | None, *, refresh: bool) -> None:
        """Keep `spec` at `revision` (0: read as absent) unless a newer revision is kept.

        `refresh`: a read of the bucket. One that finds no app while the cache holds a
        newer delete agrees with it, and confirms it.
        """
        if not self.size:
            return
        now = time.monotonic()
        cached = self._entries.get(app)
        if cached is not None and cached[0] > revision:
            if refresh and spec is None and cached[1] is None:
                self._entries[app] = (cached[0], None, now)
            return
        self._entries[app] = (revision, spec, now)
        self._entries.move_to_end(app)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    async def _on_change(self, msg: Msg) -> None:
        kv = self.apps.kv
        app = app_name(msg.subject[len(kv._pre) :])
        revision = msg.metadata.sequence.stream
        operation = msg.headers.get(KV_OP) if msg.headers else None
        spec = None
        if operation not in (KV_DEL, KV_PURGE) and msg.data:
            try:
                spec = codec.decode(AppSpec, msg.data)
            except (codec.DecodeError, ValidationError) as exc:
                # Unreadable: forget it, so the next lookup reads (and reports) it itself.
                log.warning("app_spec_unreadable", app=app, error=str(exc)[:300])
                self._entries.pop(app, None)
                return
        self._store(app, revision, spec, refresh=False)

    def _client_reconnects(self) -> int:
        return self.apps.kv._js._nc.stats["reconnects"]
