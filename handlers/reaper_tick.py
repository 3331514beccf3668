"""reaper_tick: one pass over every deployment, pool and run on each tick.

A pass (1) stops deployments past an idle limit or, running an older
revision than their app's, past its drain limit (`handlers.rollout`), (2)
fails starts that overran their timeout, (3) keeps warm pools at size (a
job app's warm runners too, until it is idle; a `schedule` window's size
while one is open: `pools.target_size`; members of an older revision are
replaced), a few refills per app per tick, stopping the surplus when a pool
shrinks, and (4) reconciles: backend instances that no record names are
stopped, records whose instance is gone are failed and removed, and warm
pool members whose instance is gone are dropped (`handlers.reconcile`).

A deployment's activity (page loads after the first, counted heartbeats) is
read from its activity keys, one scan of the activity bucket per pass
(`handlers.activity`); keys of slots with no live deployment are deleted.
Before a deployment is stopped as idle, its keys are read again, so activity
that came in while the pass ran still saves it.

Ticks come from a ticker in every reaper process, de-duplicated by JetStream
on a per-interval message id, so any number of reaper replicas make one pass
per interval between them.
"""

from collections.abc import Awaitable, Callable

from handlers import activity, capacity, deployments, jobs, pools, reconcile, rollout, runq
from handlers.activity import Activity
from handlers.context import Context
from handlers.deployments import QUEUED_OR_LIVE, Deployment
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
IDLE = ("idle_page_load", "idle_heartbeat")


def idle_reason(dep: Deployment, seen: Activity, spec: AppSpec, now: float) -> str | None:
    """Which idle limit, if any, `dep` has passed, given its activity `seen`."""
    idle = spec.idle
    if now - dep.created_at > idle.max_lifetime_s:
        return "max_lifetime"
    if now - seen.last_page_load > idle.since_page_load_s:
        return "idle_page_load"
    if now - seen.last_active > idle.since_heartbeat_s:
        return "idle_heartbeat"
    return None


@handler(
    subjects.REAPER_TICK, schema=ReaperTick, concurrency=1, retries=1, timeout_s=300, routine=True
)
async def reaper_tick(ctx: Context, tick: ReaperTick) -> None:
    now = ctx.now()
    apps: dict[str, AppSpec | None] = {e.key: e.value for e in await ctx.state.apps.scan()}
    # Records before instances: an instance started after the listing is in no record read here.
    indexes = await ctx.state.pools.scan()
    records = await ctx.state.deployments.scan()
    marks = await activity.scan(ctx)
    instances = {i.id: i for i in await ctx.backend.list_instances()}
    known: set[str] = set()
    counts = {"reaped": 0, "failed": 0, "orphans": 0, "refills": 0, "activity_pruned": 0}

    for pool in indexes:
        known.update(await _tend_pool(ctx, pool.value, pool.key, apps, instances, now))
    for entry in records:
        key, dep, rev = entry.key, entry.value, entry.revision
        known.add(dep.instance)
        spec = await _current_spec(ctx, apps, dep.app)
        if dep.state not in QUEUED_OR_LIVE:
            if dep.state != AppState.STOPPING and now - dep.created_at > KEEP_ENDED_S:
                await ctx.state.deployments.delete(key, rev)
            continue
        seen = activity.of(dep, rollout.take_marks(key, dep, marks))
        reason = "app_removed" if spec is None else idle_reason(dep, seen, spec, now)
        reason = reason or rollout.drain_reason(dep, spec, now)
        if reason:
            recheck = _still_idle(ctx, key, dep, spec, now) if reason in IDLE else None
            stopped = await deployments.stop(ctx, key, dep, rev, reason, still_idle=recheck)
            if stopped:
                await capacity.released(ctx, dep)
            counts["reaped"] += stopped
            continue
        if await rollout.note_draining(ctx, key, dep, spec):
            counts["draining"] = counts.get("draining", 0) + 1
            continue  # its record moved on: the checks below wait for the next pass
        timeout = spec.start_timeout_s + ctx.knobs.reconcile_grace_s
        if dep.state not in (AppState.READY, AppState.QUEUED) and now - dep.created_at > timeout:
            error = ErrorInfo(
                code=codes.START_TIMEOUT, message="the app did not become ready in time"
            )
        elif dep.state == AppState.READY and reconcile.gone(instances, dep.instance):
            error = reconcile.LOST
        else:
            continue
        counts["failed"] += await reconcile.fail(ctx, key, dep, rev, error)

    for slot_marks in marks.values():  # slots with no live deployment
        grace = ctx.knobs.reconcile_grace_s
        counts["activity_pruned"] += await activity.prune(ctx, slot_marks, now - grace)

    for spec in apps.values():
        if spec is not None and pools.keeps_pool(spec):
            counts["refills"] += await pools.request_refill(
                ctx, spec, ctx.knobs.pool_refill_per_tick
            )

    for instance in instances.values():
        if instance.kind not in ("viz", "warm") or instance.id in known:
            continue
        if now - instance.created_at > ctx.knobs.reconcile_grace_s:
            await ctx.backend.stop_viz(instance.id)
            ctx.log.info("orphan_instance_stopped", instance=instance.id, app=instance.app)
            counts["orphans"] += 1
    await _tend_jobs(ctx, instances, now, counts)
    deps = {entry.key: entry.value for entry in records}
    pooled = {entry.key: entry.value for entry in indexes}
    counts["gates_mended"] = await capacity.heal(ctx, deps, pooled, now)
    # A pass that changed nothing is logged at debug: an idle stack's log stays quiet.
    changed = any(counts.values())
    (ctx.log.info if changed else ctx.log.debug)(
        "reaper_pass_finished", deployments=len(known), **counts
    )


def _still_idle(
    ctx: Context, key: str, dep: Deployment, spec: AppSpec, now: float
) -> Callable[[], Awaitable[bool]]:
    """Whether `dep` is still idle by its activity keys read now (see `deployments.stop`)."""

    async def still_idle() -> bool:
        seen = activity.of(dep, await rollout.read_marks(ctx, key, dep))
        return idle_reason(dep, seen, spec, now) in IDLE

    return still_idle


def _past_deadline(job: jobs.Job, now: float, grace: float) -> bool:
    """Whether `job` has run past its deadline. A run counts from its start: one waiting
    in its queue has no deadline yet (records from before queues count from creation)."""
    started = job.phases.started or job.phases.running
    if started is None and job.state == JobState.QUEUED:
        return False
    return now - (started or job.created_at) > job.deadline_s + grace


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
    runs = {entry.key: entry.value for entry in await ctx.state.jobs.scan()}
    known = set(runs)
    for job_id, job in runs.items():
        if job.exited_at is not None and not job.state.terminal:
            # It exited and waits for the store (job_update retries); past the results'
            # retention that will not come back.
            if now - job.exited_at > job.retention_s + grace:
                done = await jobs.advance(ctx, job_id, _results_lost(now))
                if done is not None:
                    await jobs.moved(ctx, done)
        elif not job.state.terminal and _past_deadline(job, now, grace):
            # Record the verdict first: the backend's own `cancelled` report for
            # the stop below must find the run already ended.
            done = await jobs.advance(ctx, job_id, _timed_out(now))
            await ctx.backend.cancel_job(job_id)
            if done is not None:
                await jobs.moved(ctx, done)
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
    mended = await runq.heal(ctx, runs, now)
    if mended:
        counts["queues_mended"] = mended


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
    ctx: Context,
    index: PoolIndex,
    app: str,
    apps: dict[str, AppSpec | None],
    instances: dict[str, Instance],
    now: float,
) -> set[str]:
    """Drop stuck reservations, dead members, pools of removed apps, and members past the
    pool's size now (`pools.surplus`: a schedule window closed, say). The ones kept."""
    spec = await _current_spec(ctx, apps, app)
    timeout = (spec.start_timeout_s if spec else 0.0) + ctx.knobs.reconcile_grace_s
    expired = {i for i, t in index.starting.items() if spec is None or now - t > timeout}
    dead = reconcile.dead_members(index, instances)
    stale = rollout.stale_members(index, spec) - dead if spec else set()
    target = pools.target_size(ctx, spec, index, now) if spec else 0
    excess = pools.surplus(index, target, gone=expired | dead | stale)
    if expired | excess:
        await reconcile.drop_members(ctx, app, expired | excess, "expired_or_extra")
    if dead:
        await reconcile.drop_members(ctx, app, dead, "instance_lost")
    if stale:  # replaced by members of the current revision, a few refills per tick
        await reconcile.drop_members(ctx, app, stale, rollout.OLD_REVISION)
    kept = {m.instance for m in index.warm} | set(index.starting)
    return kept - expired - excess - dead - stale
