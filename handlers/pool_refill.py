"""pool_refill: start one reserved warm instance and, once ready, list it as warm.

`pools.request_refill` (on a claim, and on each reaper tick) reserves a
place in an app's pool and publishes one `pool_refill` event per place; this
handler starts that instance: a viz app's instance, until it answers its
readiness probe, or a job app's warm runner, until it waits for a run
(`Backend.start_warm`). A reservation that expired or an app that went
away leaves nothing running. A refill is a start: it takes a place under the
handlers' `max_concurrent_starts` (`handlers.capacity`) for as long as it
starts, and gives its reservation back when none is free.

Runs ask for a job pool's refills one at a time (`pools.request_refill`'s
`unless_starting`), so a job pool's refill that ends with its pool still
short and no other place starting reserves the next place in the same write
that lists it warm: runs that come faster than one refill each (one after
another, each taking a runner) find the pool refilling back to back, not
waiting for the next run or the reaper's pass to ask. A refill that failed
or was deferred asks for nothing. A refill delivered again after it had
listed its instance warm (its handler died before the ack) leaves it be.
"""

from handlers import capacity, pools
from handlers.context import Context
from handlers.errors import StartFailed
from handlers.registry import handler
from schemas import subjects
from schemas.events import PoolRefill


@handler(subjects.POOL_REFILL, schema=PoolRefill, concurrency=4, retries=2, timeout_s=900)
async def pool_refill(ctx: Context, event: PoolRefill) -> None:
    """Start one reserved warm instance and, once ready, list it as warm."""
    spec = await ctx.state.apps.get(event.app)
    index = await ctx.state.pools.get(event.app)
    if index is not None and any(m.instance == event.instance for m in index.warm):
        return  # a redelivery of a refill that listed its instance: it waits, nothing to do
    reserved_at = index.starting.get(event.instance) if index else None
    if spec is None or not pools.keeps_pool(spec) or reserved_at is None:
        # The app went away, or the reservation expired: make sure nothing runs.
        await ctx.backend.stop_viz(event.instance)
        await pools.forget(ctx, event.app, event.instance)
        return
    if not await capacity.start_refill(ctx, event.app, event.instance):
        # Starts are at their limit, or page loads wait for one: the reaper asks again.
        await pools.forget(ctx, event.app, event.instance)
        ctx.log.info("pool_refill_deferred", instance=event.instance)
        return
    remaining = max(1.0, spec.start_timeout_s - (ctx.now() - reserved_at))
    try:
        if spec.kind == "job":
            await ctx.backend.start_warm(event.instance, spec, remaining)
        else:
            await ctx.backend.start_viz(event.instance, spec, pooled=True)
            await ctx.backend.wait_ready(event.instance, spec, remaining)
    except StartFailed as exc:
        ctx.log.warning(
            "pool_instance_failed",
            instance=event.instance,
            reason=exc.message,
            log_tail=exc.log_tail,
        )
        await ctx.backend.stop_viz(event.instance)
        await pools.forget(ctx, event.app, event.instance)
        return
    finally:
        await capacity.start_done(ctx, event.instance)
    member = pools.PoolMember(
        instance=event.instance,
        url=ctx.backend.url(event.instance, spec) if spec.kind == "viz" else "",
        created_at=reserved_at,
        ready_at=ctx.now(),
        revision=spec.revision,
    )

    following: list[str] = []

    def promote(index: pools.PoolIndex) -> bool:
        if index.starting.pop(event.instance, None) is None:
            return False
        index.warm.append(member)
        if spec.kind == "job":  # the next one, in the same write (see the module's doc)
            now = ctx.now()
            following[:] = pools.reserve_places(ctx, spec, index, now, 1, unless_starting=True)
        return True

    if await pools.change(ctx, event.app, promote) is None:
        # The reaper gave up on this reservation while it started.
        await ctx.backend.stop_viz(event.instance)
        return
    ctx.log.info("pool_instance_ready", instance=event.instance, app=event.app)
    await pools.ask_refills(ctx, event.app, following)
