"""reaper_tick: one pass over every deployment, pool and run on each tick.

A pass (1) stops deployments past an idle limit, (2) fails starts that
overran their timeout, (3) keeps warm pools at size, a few refills per app
per tick, and (4) reconciles: backend instances that no record names are
stopped, records whose instance is gone are failed and removed.

Ticks come from a ticker in every reaper process, de-duplicated by JetStream
on a per-interval message id, so any number of reaper replicas make one pass
per interval between them.
"""

from collections.abc import Callable

from handlers import deployments, jobs, pools
from handlers.context import Context
from handlers.deployments import LIVE, Deployment, status_of, status_subject
from handlers.pools import PoolIndex
from handlers.ports import Instance
from handlers.registry import handler
from schemas import errors as codes
from schemas import subjects
from schemas.errors import ErrorInfo
from schemas.events import ReaperTick
from schemas.spec import AppSpec
from schemas.status import AppState, JobState

# How long a failed or stopped record is kept so a late reader still sees why.
KEEP_ENDED_S = 300.0


def idle_reason(dep: Deployment, spec: AppSpec, now: float) -> str | None:
    """Which idle limit, if any, `dep` has passed."""
    idle = spec.idle
    if now - dep.created_at > idle.max_lifetime_s:
        return "max_lifetime"
    if now - dep.last_page_load > idle.since_page_load_s:
        return "idle_page_load"
    last_active = max(dep.last_page_load, dep.last_heartbeat or 0.0)
    if now - last_active > idle.since_heartbeat_s:
        return "idle_heartbeat"
    return None


@handler(subjects.REAPER_TICK, schema=ReaperTick, concurrency=1, retries=1, timeout_s=300)
async def reaper_tick(ctx: Context, tick: ReaperTick) -> None:
    now = ctx.now()
    apps: dict[str, AppSpec | None] = {e.key: e.value for e in await ctx.state.apps.scan()}
    instances = {i.id: i for i in await ctx.backend.list_instances()}
    known: set[str] = set()
    counts = {"reaped": 0, "failed": 0, "orphans": 0, "refills": 0}

    for pool in await ctx.state.pools.scan():
        known.update(await _tend_pool(ctx, pool.value, pool.key, apps, now))
    for entry in await ctx.state.deployments.scan():
        key, dep, rev = entry.key, entry.value, entry.revision
        known.add(dep.instance)
        spec = await _current_spec(ctx, apps, dep.app)
        if dep.state not in LIVE:
            if dep.state != AppState.STOPPING and now - dep.created_at > KEEP_ENDED_S:
                await ctx.state.deployments.delete(key, rev)
            continue
        reason = "app_removed" if spec is None else idle_reason(dep, spec, now)
        if reason:
            counts["reaped"] += await deployments.stop(ctx, key, dep, rev, reason)
            continue
        timeout = spec.start_timeout_s + ctx.knobs.reconcile_grace_s
        instance = instances.get(dep.instance)
        if dep.state != AppState.READY and now - dep.created_at > timeout:
            error = ErrorInfo(
                code=codes.START_TIMEOUT, message="the app did not become ready in time"
            )
        elif dep.state == AppState.READY and (instance is None or not instance.alive):
            error = ErrorInfo(
                code=codes.INSTANCE_LOST, message="the app's instance stopped unexpectedly"
            )
        else:
            continue
        failed = dep.model_copy(update={"state": AppState.FAILED, "error": error})
        if await ctx.state.deployments.update(key, failed, rev) is not None:
            await ctx.backend.stop_viz(dep.instance)
            await ctx.publish_status(status_subject(dep), status_of(failed))
            ctx.log.warning("viz_deployment_failed", instance=dep.instance, code=error.code)
            counts["failed"] += 1

    for spec in apps.values():
        if spec is not None and spec.kind == "viz" and spec.pool.size:
            counts["refills"] += await pools.request_refill(
                ctx, spec, ctx.knobs.pool_refill_per_tick
            )

    for instance in instances.values():
        if instance.kind != "viz" or instance.id in known:
            continue
        if now - instance.created_at > ctx.knobs.reconcile_grace_s:
            await ctx.backend.stop_viz(instance.id)
            ctx.log.info("orphan_instance_stopped", instance=instance.id, app=instance.app)
            counts["orphans"] += 1
    await _tend_jobs(ctx, instances, now, counts)
    ctx.log.info("reaper_pass_finished", deployments=len(known), **counts)


def _timed_out(now: float) -> Callable[[jobs.Job], jobs.Job | None]:
    error = jobs.failure(JobState.TIMED_OUT)
    return lambda job: jobs.finish(job, JobState.TIMED_OUT, now, error=error)


def _results_lost(now: float) -> Callable[[jobs.Job], jobs.Job | None]:
    return lambda job: jobs.finish(job, JobState.FAILED, now, error=jobs.RESULTS_UNAVAILABLE)


async def _tend_jobs(
    ctx: Context, instances: dict[str, Instance], now: float, counts: dict[str, int]
) -> None:
    """Stop runs past their deadline (unless they exited and wait for the store), drop
    results past retention, cancel unknown jobs."""
    grace = ctx.knobs.reconcile_grace_s
    known: set[str] = set()
    for entry in await ctx.state.jobs.scan():
        job_id, job = entry.key, entry.value
        known.add(job_id)
        if job.exited_at is not None and not job.state.terminal:
            # It exited and waits for the store (job_update retries); past the results'
            # retention that will not come back.
            if now - job.exited_at > job.retention_s + grace:
                done = await jobs.advance(ctx, job_id, _results_lost(now))
                if done is not None:
                    await jobs.publish(ctx, done)
        elif not job.state.terminal and now - job.created_at > job.deadline_s + grace:
            # Record the verdict first: the backend's own `cancelled` report for
            # the stop below must find the run already ended.
            done = await jobs.advance(ctx, job_id, _timed_out(now))
            await ctx.backend.cancel_job(job_id)
            if done is not None:
                await jobs.publish(ctx, done)
                counts["timed_out"] = counts.get("timed_out", 0) + 1
        elif job.state.terminal and now - (job.phases.finished or job.created_at) > job.retention_s:
            if ctx.store is not None:
                await ctx.store.delete_job(job_id)
            await ctx.state.jobs.delete(job_id)
            ctx.log.info("job_expired", job_id=job_id)
            counts["expired"] = counts.get("expired", 0) + 1
    for instance in instances.values():
        if (
            instance.kind == "job"
            and instance.id not in known
            and now - instance.created_at > grace
        ):
            await ctx.backend.cancel_job(instance.id)
            ctx.log.info("orphan_job_cancelled", job_id=instance.id)
            counts["orphans"] += 1


async def _current_spec(ctx: Context, apps: dict[str, AppSpec | None], name: str) -> AppSpec | None:
    """The app's spec, asked for again when the pass's list lacks it.

    The list is read at the start of the pass; an app registered since, whose
    first page load made a deployment the pass then sees, is not in it. Only an
    app that is still absent when asked directly counts as removed.
    """
    if name not in apps:
        apps[name] = await ctx.state.apps.get(name)
    return apps[name]


async def _tend_pool(
    ctx: Context, index: PoolIndex, app: str, apps: dict[str, AppSpec | None], now: float
) -> set[str]:
    """Expire stuck reservations and empty pools of removed apps. Returns the instances kept."""
    spec = await _current_spec(ctx, apps, app)
    timeout = (spec.start_timeout_s if spec else 0.0) + ctx.knobs.reconcile_grace_s
    expired = {i for i, t in index.starting.items() if spec is None or now - t > timeout}
    excess = (
        [m.instance for m in index.warm[spec.pool.size :]]
        if spec
        else [m.instance for m in index.warm]
    )
    drop = expired | set(excess)
    if drop:

        def remove(idx: PoolIndex) -> bool:
            for instance in drop:
                idx.starting.pop(instance, None)
            idx.warm = [m for m in idx.warm if m.instance not in drop]
            return True

        await pools.change(ctx, app, remove)
        for instance in drop:
            await ctx.backend.stop_viz(instance)
            ctx.log.info("pool_instance_dropped", instance=instance, app=app)
    kept = {m.instance for m in index.warm} | set(index.starting)
    return kept - drop
