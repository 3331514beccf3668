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

from handlers.deployments import new_instance_id, slot_key
from schemas import subjects
from schemas.events import PoolRefill
from schemas.spec import AppSpec

if TYPE_CHECKING:  # the context holds the state, which holds these records
    from handlers.context import Context

POOL = "pool"


class PoolMember(BaseModel):
    """A warm instance, ready for the next page load to claim."""

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


async def claim(ctx: Context, app: str) -> PoolMember | None:
    """Take the oldest warm instance of `app`'s pool that is alive, or None if none is.

    Each one taken is claimed from the backend, which says whether it still
    serves; one that does not (its process died, say with a restarted `spinyard
    up`) is out of the pool already and is stopped, and the next is taken.
    """
    taken: list[PoolMember] = []

    def take(index: PoolIndex) -> bool:
        taken.clear()
        if not index.warm:
            return False
        taken.append(index.warm.pop(0))
        return True

    while True:
        if await change(ctx, app, take) is None:
            return None
        member = taken[0]
        if await ctx.backend.claim(member.instance):
            ctx.log.info("pool_instance_claimed", instance=member.instance, app=app)
            return member
        ctx.log.warning("pool_instance_dead", instance=member.instance, app=app)
        await ctx.backend.stop_viz(member.instance)


async def request_refill(ctx: Context, spec: AppSpec, limit: int) -> int:
    """Reserve up to `limit` pool places and publish a `pool_refill` event for each.

    Returns:
        How many refills were requested.
    """
    new: list[str] = []
    now = ctx.now()

    def reserve(index: PoolIndex) -> bool:
        new.clear()
        missing = min(spec.pool.size - index.size(), limit)
        if missing <= 0:
            return False
        for _ in range(missing):
            instance = new_instance_id()
            index.starting[instance] = now
            new.append(instance)
        return True

    if await change(ctx, spec.name, reserve) is None:
        return 0
    for instance in new:
        event = PoolRefill(app=spec.name, instance=instance)
        await ctx.emit(
            subjects.event(subjects.POOL_REFILL, spec.name), event, msg_id=f"refill-{instance}"
        )
    return len(new)


async def forget(ctx: Context, app: str, instance: str) -> None:
    """Drop an instance from the pool record, warm or starting."""

    def drop(index: PoolIndex) -> bool:
        before = index.size()
        index.starting.pop(instance, None)
        index.warm = [m for m in index.warm if m.instance != instance]
        return index.size() != before

    await change(ctx, app, drop)
