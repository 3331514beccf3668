"""Rollout: after an update, new viewers get the new revision; older instances drain.

Publishing over HTTP stamps each spec it writes to the apps bucket with its
revision (`AppSpec.revision`; null for apps added over NATS, which never
roll out). Deployments, pool members and runs record the revision they run,
and everything here compares that with the current spec's. Revision numbers
only grow (a rollback is a new revision), so "older" is a plain `<`: a
handler whose spec memory (`handlers.memo`) is a moment behind never takes
a newer instance for an older one.

What an update does:

- A shared app's next page load moves the ready instance of an older
  revision out of the shared slot into a draining record of its own
  (`owner.title.instance.<id>` in the deployments bucket, slot
  `instance.<id>`), then wins the emptied slot and starts (or claims) an
  instance of the current revision. Viewers already on the old instance keep
  it: their pages' heartbeats name the instance they show
  (`Heartbeat.instance`), and a heartbeat naming an instance is recorded on
  that instance's own slot key (`owner.title.instance.<id>.heartbeat`),
  which the reaper also counts for the shared slot while that instance
  serves it. A draining record announces nothing on the app's status
  subject, which belongs to the current instance.
- A per-session app's session keeps its instance (its reloads and
  heartbeats go to it); new sessions get the current revision.
- The reaper notes when it first sees a live instance of an older revision
  (`Deployment.draining_since`; a moved shared instance has it from the
  move) and stops it, reason `drained`, `rollout.drain_s` later (the current
  spec's), unless an idle limit (`idle_*`, `max_lifetime`) stops it first.
- Warm pool members of an older revision are never claimed; the reaper
  drops them (reason `old_revision`) and refills the pool with members of
  the current revision, `reaper.pool_refill_per_tick` per app per tick.
- A run records the revision current when it was accepted, or the one its
  request pins (`RunRequest.revision`, one still kept in the app's history),
  and starts with that revision's spec (`spec_of_run`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import ValidationError

from handlers import activity, revisions
from handlers.deployments import SHARED, Deployment, session_slot, slot_key
from handlers.errors import Rejected
from schemas import errors as codes
from schemas.spec import AppSpec

if TYPE_CHECKING:  # the context holds the state, which holds these records
    from handlers.activity import Mark
    from handlers.context import Context
    from handlers.pools import PoolIndex
    from handlers.state import Entry

INSTANCE = "instance"
DRAINED = "drained"
OLD_REVISION = "old_revision"


def older(revision: int | None, current: int | None) -> bool:
    """Whether something running `revision` is behind the `current` spec's revision.

    An app with no revision (added over NATS) never rolls out; an instance
    with none (started before its app was published) is older than any.
    """
    return current is not None and (revision is None or revision < current)


def instance_slot(instance: str) -> str:
    """The slot of one instance on its own: a shared instance drains there after an update."""
    return f"{INSTANCE}.{instance}"


def heartbeat_slot(spec: AppSpec, session: str, instance: str | None) -> str:
    """The slot whose activity a counted heartbeat is: the session's own (per-session apps),
    the instance the page shows (shared apps, when the page says), else the shared slot."""
    if spec.sharing == "per_session":
        return session_slot(session)
    return instance_slot(instance) if instance else SHARED


def _merge(*found: dict[str, Entry[Mark]]) -> dict[str, Entry[Mark]]:
    """Activity keys of several slots as one slot's: the latest mark of each kind."""
    merged: dict[str, Entry[Mark]] = {}
    for marks in found:
        for kind, entry in marks.items():
            if kind not in merged or entry.value.at > merged[kind].value.at:
                merged[kind] = entry
    return merged


def _own_key(key: str, dep: Deployment) -> str | None:
    """The instance's own slot key, when `dep` serves the shared slot (its viewers' heartbeats
    that name it are written there)."""
    return slot_key(dep.app, instance_slot(dep.instance)) if dep.slot == SHARED else None


def take_marks(
    key: str, dep: Deployment, marks: dict[str, dict[str, Entry[Mark]]]
) -> dict[str, Entry[Mark]]:
    """`dep`'s activity keys out of a reaper pass's scan (`activity.scan`), taken from it."""
    own = _own_key(key, dep)
    return _merge(marks.pop(key, {}), marks.pop(own, {}) if own else {})


async def read_marks(ctx: Context, key: str, dep: Deployment) -> dict[str, Entry[Mark]]:
    """`dep`'s activity keys, read now."""
    own = _own_key(key, dep)
    return _merge(await activity.read(ctx, key), await activity.read(ctx, own) if own else {})


async def retire(ctx: Context, key: str, entry: Entry[Deployment]) -> bool:
    """Move a shared instance of an older revision out of the shared slot (see module doc).

    The draining record is written first (a create: a try before this one, or a
    concurrent page load, may have written it), then the shared slot is deleted
    at the revision read. If that delete loses (another page load or the reaper
    got there first) the caller reads the slot again; a draining record left for
    an instance the reaper stopped meanwhile is failed as lost by its next pass.

    Returns:
        Whether the shared slot was emptied.
    """
    dep = entry.value
    own = slot_key(dep.app, instance_slot(dep.instance))
    seen = activity.of(dep, await read_marks(ctx, key, dep))
    drained = dep.model_copy(
        update={
            "slot": instance_slot(dep.instance),
            "last_page_load": seen.last_page_load,
            "draining_since": dep.draining_since or ctx.now(),
        }
    )
    if seen.last_heartbeat is not None:  # heartbeats that named no instance count for it too
        await ctx.state.activity.put(
            activity.key(own, activity.HEARTBEAT), activity.Mark(at=seen.last_heartbeat)
        )
    await ctx.state.deployments.create(own, drained)
    if not await ctx.state.deployments.delete(key, entry.revision):
        return False
    ctx.log.info("viz_deployment_draining", instance=dep.instance, revision=dep.revision)
    return True


async def note_draining(ctx: Context, key: str, dep: Deployment, spec: AppSpec) -> bool:
    """Record when the reaper first saw a live instance of an older revision.

    Returns:
        Whether the record was changed (its revision moved: act on it next pass).
    """
    if dep.draining_since is not None or not older(dep.revision, spec.revision):
        return False
    now = ctx.now()

    def mark(d: Deployment) -> Deployment | None:
        if d.instance != dep.instance or d.draining_since is not None:
            return None
        return d.model_copy(update={"draining_since": now})

    if await ctx.state.deployments.change(key, mark) is None:
        return False
    ctx.log.info("viz_deployment_draining", instance=dep.instance, revision=dep.revision)
    return True


def drain_reason(dep: Deployment, spec: AppSpec, now: float) -> str | None:
    """`DRAINED` once `dep` has drained for the current spec's `rollout.drain_s`."""
    since = dep.draining_since
    return DRAINED if since is not None and now - since > spec.rollout.drain_s else None


def stale_members(index: PoolIndex, spec: AppSpec) -> set[str]:
    """Warm pool members of an older revision than `spec`'s: no page load will claim them."""
    return {m.instance for m in index.warm if older(m.revision, spec.revision)}


async def spec_at(ctx: Context, app: str, revision: int) -> AppSpec:
    """Revision `revision` of `app`, from its history, validated (presets expanded) as
    publishing does, and stamped with its number.

    Raises:
        Rejected: `unknown_revision` if it is not kept (or no longer valid).
    """
    history = await ctx.state.revisions.get(app) if ctx.state.revisions else None
    kept = history.find(revision) if history else None
    if kept is None:
        raise Rejected(revisions.not_kept(app, revision), code=codes.UNKNOWN_REVISION)
    try:
        spec = AppSpec.model_validate(kept.spec)
    except ValidationError as exc:
        message = f"revision {revision} of {app} is no longer a valid spec"
        raise Rejected(message, code=codes.UNKNOWN_REVISION) from exc
    return spec.model_copy(update={"revision": revision})


async def spec_shown(ctx: Context, app: str, revision: int | None) -> AppSpec | None:
    """The spec a finished run's results are shown by (types, charts): its revision's if
    still kept, else the current one (None if the app is gone)."""
    current = await ctx.state.apps.get(app)
    if current is None or revision is None or revision == current.revision:
        return current
    try:
        return await spec_at(ctx, app, revision)
    except Rejected:
        return current


async def spec_of_run(ctx: Context, current: AppSpec, revision: int | None) -> AppSpec:
    """The spec a run of `revision` runs with: the current one, or a kept earlier one.

    Raises:
        Rejected: `unknown_revision` (see `spec_at`).
    """
    if revision is None or revision == current.revision:
        return current
    return await spec_at(ctx, current.name, revision)
