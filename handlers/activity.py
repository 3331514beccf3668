"""Activity: when a deployment was last loaded and last given a counted heartbeat.

A crowd on one shared app must not fight over one record: when every
heartbeat compare-and-set the deployment record, 200 viewers sending three
heartbeats each made 6,162 write conflicts in 6,762 tries and 123 of the 600
heartbeats went back to the queue. So activity is not in the deployment
record. Each deployment slot has two activity keys in the activity bucket
(`owner.title.shared.heartbeat`, `owner.title.session.<sid>.page_load`, ...),
and a heartbeat or a page load writes its handling time there with a plain
put: one KV write, never a conflict, however many viewers write at once.

Puts are last-writer-wins, not a maximum: two viewers' heartbeats handled a
few milliseconds apart may land in either order, so a key can go back by
those milliseconds. No idle limit (seconds to hours) can tell. For the same
reason a handler process does not write a key again that it finished
writing less than `handlers.activity_write_s` (100 ms) ago: a crowd's
thousands of heartbeats a second become ten writes a second per key and
process, and the key lags by at most that long.

The reaper folds the keys into its view of each deployment (`of`) and
removes the keys of slots that no live deployment has (`prune`). A key
written before its deployment was created tells nothing about it: the
deployment's own `last_page_load` (its creation) is later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel

from schemas import subjects

if TYPE_CHECKING:  # the context holds the state, which holds these records
    from handlers.context import Context
    from handlers.deployments import Deployment
    from handlers.state import Entry

PAGE_LOAD = subjects.PAGE_LOAD
HEARTBEAT = subjects.HEARTBEAT
KINDS = (PAGE_LOAD, HEARTBEAT)


class Mark(BaseModel):
    """The value of an activity key: when a page load or counted heartbeat was handled."""

    at: float


@dataclass(frozen=True)
class Activity:
    """A deployment's last page load and last counted heartbeat (None: none since it began)."""

    last_page_load: float
    last_heartbeat: float | None = None

    @property
    def last_active(self) -> float:
        return max(self.last_page_load, self.last_heartbeat or 0.0)


def key(slot_key: str, kind: str) -> str:
    """The activity key of `kind` (`PAGE_LOAD` or `HEARTBEAT`) of the deployment at `slot_key`."""
    return f"{slot_key}.{kind}"


def split(activity_key: str) -> tuple[str, str]:
    """(slot key, kind) of an activity key."""
    slot_key, kind = activity_key.rsplit(".", 1)
    return slot_key, kind


async def record(ctx: Context, slot_key: str, kind: str) -> bool:
    """Note a page load or a counted heartbeat of the deployment at `slot_key`, now.

    Not written if this process finished writing the same key less than
    `handlers.activity_write_s` ago (`handlers.memo`): the key would move by
    less than that.

    Returns:
        Whether the key was written.
    """
    activity_key, now = key(slot_key, kind), ctx.now()
    if ctx.memo.written_recently(activity_key, now):
        return False
    await ctx.state.activity.put(activity_key, Mark(at=now))
    ctx.memo.wrote(activity_key, now)
    return True


async def read(ctx: Context, slot_key: str) -> dict[str, Entry[Mark]]:
    """The activity keys of one deployment, by kind (absent kinds left out)."""
    found = {}
    for kind in KINDS:
        entry = await ctx.state.activity.read(key(slot_key, kind))
        if entry is not None:
            found[kind] = entry
    return found


async def scan(ctx: Context) -> dict[str, dict[str, Entry[Mark]]]:
    """Every activity key, by slot key and kind: one pass over the bucket."""
    found: dict[str, dict[str, Entry[Mark]]] = {}
    for entry in await ctx.state.activity.scan():
        slot_key, kind = split(entry.key)
        found.setdefault(slot_key, {})[kind] = entry
    return found


def of(dep: Deployment, marks: dict[str, Entry[Mark]]) -> Activity:
    """`dep`'s activity: its record's page load, and its activity keys from since it began."""

    def since_created(kind: str) -> float | None:
        entry = marks.get(kind)
        return entry.value.at if entry and entry.value.at >= dep.created_at else None

    return Activity(
        last_page_load=max(dep.last_page_load, since_created(PAGE_LOAD) or 0.0),
        last_heartbeat=since_created(HEARTBEAT),
    )


async def prune(ctx: Context, marks: dict[str, Entry[Mark]], older_than: float) -> int:
    """Delete keys of a slot that no live deployment holds, if written before `older_than`.

    A key written since may belong to a deployment created after the caller
    looked; each delete is at the revision read, so a key written again
    meanwhile stays.

    Returns:
        How many keys were deleted.
    """
    deleted = 0
    for entry in marks.values():
        if entry.value.at < older_than:
            deleted += await ctx.state.activity.delete(entry.key, entry.revision)
    return deleted
