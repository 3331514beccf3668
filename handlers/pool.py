"""Warm pools: claim a ready instance on page load, and refill one at a time.

An app's pool is one KV record (`owner.title.pool`) listing warm instances
and those still starting. Claims and refills change it with compare-and-set,
so two page loads never take the same instance and two reaper passes never
over-fill. Each refill is its own `pool_refill` event, which spreads start-ups
over time and across replicas instead of starting a whole pool at once.
"""

from handlers.context import Context
from handlers.errors import StartFailed
from handlers.registry import handler
from handlers.state import POOL, PoolIndex, PoolMember, slot_key
from handlers.viz import new_instance_id
from schemas import subjects
from schemas.events import PoolRefill
from schemas.spec import AppSpec


async def change_pool(ctx: Context, app: str, edit) -> PoolIndex | None:
    """Compare-and-set on an app's pool record: `edit(index)` changes it in place, False aborts."""

    def change(index: PoolIndex) -> PoolIndex | None:
        return None if edit(index) is False else index

    entry = await ctx.state.change(
        ctx.state.deployments, slot_key(app, POOL), PoolIndex, change, default=PoolIndex
    )
    return entry.value if entry else None


async def claim(ctx: Context, app: str) -> PoolMember | None:
    """Take the oldest warm instance of `app`'s pool, or None if the pool is empty."""
    taken: list[PoolMember] = []

    def take(index: PoolIndex) -> bool:
        taken.clear()
        if not index.warm:
            return False
        taken.append(index.warm.pop(0))
        return True

    if await change_pool(ctx, app, take) is None:
        return None
    member = taken[0]
    await ctx.backend.claim(member.instance)
    ctx.log.info("pool_instance_claimed", instance=member.instance, app=app)
    return member


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

    if await change_pool(ctx, spec.name, reserve) is None:
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

    await change_pool(ctx, app, drop)


@handler(subjects.POOL_REFILL, schema=PoolRefill, concurrency=4, retries=2, timeout_s=900)
async def pool_refill(ctx: Context, event: PoolRefill) -> None:
    """Start one reserved warm instance and, once ready, list it as warm."""
    spec = await ctx.state.get_app(event.app)
    entry = await ctx.state.read(ctx.state.deployments, slot_key(event.app, POOL), PoolIndex)
    reserved_at = entry.value.starting.get(event.instance) if entry else None
    if spec is None or spec.pool.size == 0 or reserved_at is None:
        # The app went away, or the reservation expired: make sure nothing runs.
        await ctx.backend.stop_viz(event.instance)
        await forget(ctx, event.app, event.instance)
        return
    await ctx.backend.start_viz(event.instance, spec, pooled=True)
    remaining = max(1.0, spec.start_timeout_s - (ctx.now() - reserved_at))
    try:
        await ctx.backend.wait_ready(event.instance, spec, remaining)
    except StartFailed as exc:
        ctx.log.warning("pool_instance_failed", instance=event.instance, reason=exc.message)
        await ctx.backend.stop_viz(event.instance)
        await forget(ctx, event.app, event.instance)
        return
    member = PoolMember(
        instance=event.instance,
        url=ctx.backend.url(event.instance, spec),
        created_at=reserved_at,
        ready_at=ctx.now(),
    )

    def promote(index: PoolIndex) -> bool:
        if index.starting.pop(event.instance, None) is None:
            return False
        index.warm.append(member)
        return True

    if await change_pool(ctx, event.app, promote) is None:
        # The reaper gave up on this reservation while it started.
        await ctx.backend.stop_viz(event.instance)
        return
    ctx.log.info("pool_instance_ready", instance=event.instance, app=event.app)
