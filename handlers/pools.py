"""Warm pools: the record of an app's ready instances, and its operations.

An app's pool is one record (`owner.title.pool` in the deployments bucket;
see `handlers.state`) listing warm instances and those still starting.
Claims and refills change it with compare-and-set, so two page loads never
take the same instance and two reaper passes never over-fill. Each refill is
its own `pool_refill` event (handled in `handlers.pool_refill`), which
spreads start-ups over time and across replicas instead of starting a whole
pool at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from handlers import rollout
from handlers.deployments import new_instance_id, slot_key
from schemas import subjects
from schemas.events import PoolRefill
from schemas.schedule import scheduled_pool
from schemas.spec import AppSpec

if TYPE_CHECKING:  # the context holds the state, which holds these records
    from handlers.context import Context

POOL = "pool"
POOL_KEYS = f"*.*.{POOL}"  # the KV key pattern of every app's pool record
_TOUCH_S = 1.0  # an empty pool's last use is written at most this often


class PoolMember(BaseModel):
    """A warm instance, ready for the next page load to claim."""

    instance: str
    url: str
    created_at: float
    ready_at: float
    revision: int | None = Field(None, description="The app's revision it runs")


class PoolIndex(BaseModel):
    """An app's warm pool: ready instances, and those still starting."""

    warm: list[PoolMember] = Field(default_factory=list)
    starting: dict[str, float] = Field(default_factory=dict, description="instance -> start time")
    used_at: float | None = Field(
        None, description="A job app's: when a run last asked for a warm runner (or the pool began)"
    )

    def size(self) -> int:
        return len(self.warm) + len(self.starting)


def pool_key(app: str) -> str:
    """The KV key of `app`'s pool record, beside its deployments."""
    return slot_key(app, POOL)


def is_pool_key(key: str) -> bool:
    """Whether a key of the deployments bucket is a pool's (`owner.title.pool`)."""
    return key.count(".") == 2 and key.endswith(f".{POOL}")


async def change(ctx: Context, app: str, edit: Callable[[PoolIndex], bool]) -> PoolIndex | None:
    """Compare-and-set on an app's pool record: `edit(index)` changes it in place, False aborts.

    Returns:
        The written record, or None if `edit` aborted.
    """

    def apply(index: PoolIndex) -> PoolIndex | None:
        return None if edit(index) is False else index

    entry = await ctx.state.pools.change(app, apply, default=PoolIndex)
    return entry.value if entry else None


def keeps_pool(spec: AppSpec) -> bool:
    """Whether `spec` has a warm pool at some time: a `pool.size`, or a schedule window's."""
    return spec.pool.size > 0 or any(window.pool for window in spec.schedule)


def target_size(ctx: Context, spec: AppSpec, index: PoolIndex | None, now: float) -> int:
    """How many warm members `spec`'s pool should have now.

    The size is the largest open `schedule` window's (`schemas.schedule`), else
    `pool.size`. A viz app's pool is always that. A job app's is that while
    runs come, and 0 once no run has asked for a warm runner for
    `idle.since_heartbeat_s` (its runners are reaped like an idle deployment;
    the next run starts cold and the pool fills again), except in an open
    window: the schedule says runs are coming. 0 on a backend that keeps no
    warm runners.
    """
    scheduled = scheduled_pool(spec.schedule, now) if spec.schedule else None
    size = spec.pool.size if scheduled is None else scheduled
    if spec.kind != "job":
        return size
    if not ctx.backend.warm_runners:
        return 0
    used_at = index.used_at if index is not None else None
    if scheduled is None and used_at is not None and now - used_at > spec.idle.since_heartbeat_s:
        return 0
    return size


def surplus(index: PoolIndex, target: int, gone: set[str]) -> set[str]:
    """Members to stop so that `index`, without the `gone` ones, holds at most `target`.

    Reservations still starting go first, then the newest warm members: the
    oldest stay, as claims take the oldest first. (A window closing, a job
    pool going idle, a smaller `pool.size`.)
    """
    starting = [i for i in index.starting if i not in gone]
    warm = [m.instance for m in index.warm if m.instance not in gone]
    extra = len(starting) + len(warm) - target
    if extra <= 0:
        return set()
    # Reversed first, so that among reservations of one pass the later one goes first.
    by_time = sorted(starting[::-1], key=index.starting.__getitem__, reverse=True)
    newest_first = by_time + warm[::-1]
    return set(newest_first[:extra])


async def claim(
    ctx: Context,
    app: str,
    used_at: float | None = None,
    revision: int | None = None,
    *,
    exact: bool = False,
) -> PoolMember | None:
    """Take the oldest warm instance of `app`'s pool that is alive, or None if none is.

    Members of an older revision than `revision` (the spec's) are passed over:
    the reaper replaces them (`handlers.rollout`). With `exact`, so are newer
    ones (a run runs the revision it records, which a spec remembered a moment
    too long may still name).

    Each one taken is claimed from the backend, which says whether it still
    serves; one that does not (its process died, say with a restarted `spinyard
    up`) is out of the pool already and is stopped, and the next is taken.
    `used_at` (a run's start) is recorded as the pool's last use, also when
    it is empty (so an idle job pool fills again).
    """
    taken: list[PoolMember] = []

    def take(index: PoolIndex) -> bool:
        taken.clear()
        touch = used_at is not None and used_at - (index.used_at or 0.0) > _TOUCH_S
        if touch:
            index.used_at = used_at
        fresh = [
            m
            for m in index.warm
            if not rollout.older(m.revision, revision)
            and not (exact and rollout.older(revision, m.revision))
        ]
        if not fresh:
            return touch
        taken.append(fresh[0])
        index.warm.remove(fresh[0])
        return True

    while True:
        if await change(ctx, app, take) is None or not taken:
            return None
        member = taken[0]
        if await ctx.backend.claim(member.instance):
            ctx.log.info("pool_instance_claimed", instance=member.instance, app=app)
            return member
        ctx.log.warning("pool_instance_dead", instance=member.instance, app=app)
        await ctx.backend.stop_viz(member.instance)


async def request_refill(
    ctx: Context, spec: AppSpec, limit: int, *, unless_starting: bool = False
) -> int:
    """Reserve up to `limit` pool places and publish a `pool_refill` event for each.

    With `unless_starting`, nothing is reserved while one of the pool's places
    is still starting: a burst of runs that takes a job pool's warm runners
    asks for one refill at a time, so refills (each a runner's start) do not
    compete with the burst's own runs; each refill that ends asks for the next
    (`handlers.pool_refill`), and the reaper tops the pool up too.

    Returns:
        How many refills were requested.
    """
    new: list[str] = []
    now = ctx.now()

    def reserve(index: PoolIndex) -> bool:
        new[:] = reserve_places(ctx, spec, index, now, limit, unless_starting=unless_starting)
        return bool(new)  # (nothing to reserve: nothing is written)

    if await change(ctx, spec.name, reserve) is None:
        return 0
    await ask_refills(ctx, spec.name, new)
    return len(new)


def reserve_places(
    ctx: Context,
    spec: AppSpec,
    index: PoolIndex,
    now: float,
    limit: int,
    *,
    unless_starting: bool = False,
) -> list[str]:
    """Reserve up to `limit` places the pool lacks in `index` (changed in place): their
    instance ids, to pass to `ask_refills` once the change is written (a job pool that
    never began counts as used from `now` in it)."""
    if spec.kind == "job" and index.used_at is None:
        index.used_at = now  # a new job pool counts as used when it begins
    if unless_starting and index.starting:
        return []
    missing = min(target_size(ctx, spec, index, now) - index.size(), limit)
    new = [new_instance_id() for _ in range(max(missing, 0))]
    for instance in new:
        index.starting[instance] = now
    return new


async def ask_refills(ctx: Context, app: str, instances: list[str]) -> None:
    """Publish a `pool_refill` event for each reserved place."""
    subject = subjects.event(subjects.POOL_REFILL, app)
    for instance in instances:
        event = PoolRefill(app=app, instance=instance)
        await ctx.emit(subject, event, msg_id=f"refill-{instance}")


async def forget(ctx: Context, app: str, instance: str) -> None:
    """Drop an instance from the pool record, warm or starting."""

    def drop(index: PoolIndex) -> bool:
        before = index.size()
        index.starting.pop(instance, None)
        index.warm = [m for m in index.warm if m.instance != instance]
        return index.size() != before

    await change(ctx, app, drop)
