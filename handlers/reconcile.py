"""Reconcile: records whose instance is gone are taken out of service.

After `spinyard up` is stopped and started again on the same data dir, the
local backend's app processes are gone (they died with the old run) while
the KV still lists them: ready deployments, and warm pool members that page
loads would claim. Before this module, the first page loads of a pooled app
claimed such members and the page showed the gateway's `not_found`, then
`failed: the app's instance stopped unexpectedly`; the reaper never noticed
dead pool members at all.

Two callers use it: the reaper on every pass (`lost`, `dead_members`), and
`at_start`, which the page_load handler runs once before its consumer
fetches anything (`HandlerSpec.on_start`), so no page load after a restart
is answered from a dead instance. A claim checks the instance itself
(`pools.claim`). Records are read before instances are listed, so an
instance started after the listing is never in a record read before it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from handlers import capacity, pools
from handlers.deployments import Deployment, announces, status_of, status_subject
from handlers.pools import PoolIndex
from handlers.ports import Instance
from schemas import errors as codes
from schemas.errors import ErrorInfo
from schemas.status import AppState

if TYPE_CHECKING:  # the context holds the state, which holds these records
    from handlers.context import Context

LOST = ErrorInfo(code=codes.INSTANCE_LOST, message="the app's instance stopped unexpectedly")


def gone(instances: dict[str, Instance], instance: str) -> bool:
    """Whether the backend's listing has no live `instance`."""
    found = instances.get(instance)
    return found is None or not found.alive


async def fail(ctx: Context, key: str, dep: Deployment, revision: int, error: ErrorInfo) -> bool:
    """Fail a deployment (the next page load replaces it) and stop what is left of it.

    Returns:
        False if the record changed first (nothing was done).
    """
    failed = dep.model_copy(update={"state": AppState.FAILED, "error": error})
    if await ctx.state.deployments.update(key, failed, revision) is None:
        return False
    await ctx.backend.stop_viz(dep.instance)
    if announces(dep):
        await ctx.publish_status(status_subject(dep), status_of(failed))
    ctx.log.warning("viz_deployment_failed", instance=dep.instance, code=error.code)
    await capacity.released(ctx, dep)
    return True


def dead_members(index: PoolIndex, instances: dict[str, Instance]) -> set[str]:
    """Warm members of a pool whose instance is gone. (Reservations still starting are
    left to their start timeout: their `pool_refill` event may not have run yet.)"""
    return {m.instance for m in index.warm if gone(instances, m.instance)}


async def drop_members(ctx: Context, app: str, drop: set[str], reason: str) -> None:
    """Take instances out of an app's pool record, warm or starting, and stop them.

    Only those still in the record are stopped: `drop` was chosen from a
    record read earlier, and a member a page load claimed since is a viewer's
    now (a window closing drops many members while its last viewers come).
    """
    removed: set[str] = set()

    def remove(index: PoolIndex) -> bool:
        removed.clear()
        removed.update(i for i in drop if index.starting.pop(i, None) is not None)
        removed.update(m.instance for m in index.warm if m.instance in drop)
        index.warm = [m for m in index.warm if m.instance not in drop]
        return bool(removed)

    await pools.change(ctx, app, remove)
    for instance in removed:
        await ctx.backend.stop_viz(instance)
        ctx.log.info("pool_instance_dropped", instance=instance, app=app, reason=reason)


async def at_start(ctx: Context) -> dict[str, int]:
    """Fail ready deployments and drop warm pool members whose instance is gone.

    Starts under way are left alone: their page load or pool refill, if it
    did not finish, is delivered again and resumes them.

    Returns:
        How many deployments were failed and pool members dropped.
    """
    deployments = await ctx.state.deployments.scan()
    indexes = await ctx.state.pools.scan()
    instances = {i.id: i for i in await ctx.backend.list_instances()}
    counts = {"failed": 0, "dropped": 0}
    for entry in deployments:
        dep = entry.value
        if dep.state == AppState.READY and gone(instances, dep.instance):
            counts["failed"] += await fail(ctx, entry.key, dep, entry.revision, LOST)
    for entry in indexes:
        dead = dead_members(entry.value, instances)
        if dead:
            await drop_members(ctx, entry.key, dead, "instance_lost")
            counts["dropped"] += len(dead)
    ctx.log.info("start_reconciled", **counts)
    return counts
