"""page_load: give the page a ready app, starting or claiming one if needed.

With a live deployment for the page's slot (the app's shared slot, or the
session's own), it answers with the current status, then records the load in
the slot's activity key (a plain put, see `handlers.activity`; skipped if
this process wrote it a moment ago) and reads the deployment once more, in
case it was being stopped meanwhile (then it starts one in its place).
Otherwise it wins the slot with a KV create (only one of any number of
concurrent page loads can), then claims a warm instance or starts a new one,
publishing `starting` and then `ready` or `failed`. A new deployment passes
its limits first (`handlers.capacity`: `max_instances`,
`max_instances_per_session`, `max_concurrent_starts`); past one it waits
`queued` in its slot until a page load for the slot (the viewer's, or the
wake-up sent when a place frees) finds it may go on.

A redelivered page load that created a deployment resumes that deployment,
so a handler killed mid-start does not leave a second instance behind. Before
a page_load consumer fetches its first event, ready deployments and warm
pool members whose instance is gone (after a restart) are taken out of
service (`reconcile.at_start`).
"""

from contextlib import aclosing

from handlers import activity, capacity, pools, reconcile, rollout
from handlers.context import Context
from handlers.deployments import (
    LIVE,
    QUEUED_OR_LIVE,
    SHARED,
    Deployment,
    load_viz_app,
    mutate,
    new_instance_id,
    session_slot,
    slot_key,
    status_of,
)
from handlers.errors import StartFailed
from handlers.registry import handler
from handlers.state import cas_loop
from schemas import subjects
from schemas.errors import ErrorInfo
from schemas.events import PageLoad
from schemas.spec import AppSpec
from schemas.status import AppState, AppStatus, Phases


async def _page_load_failed(ctx: Context, event: PageLoad, error: ErrorInfo) -> None:
    """Tell the page why its load could not be served."""
    spec = await ctx.state.apps.get(event.app)
    session = event.session if spec is not None and spec.sharing == "per_session" else None
    status = AppStatus(app=event.app, state=AppState.FAILED, error=error, session=session)
    await ctx.publish_status(subjects.app_status(event.app, session), status)


@handler(
    subjects.PAGE_LOAD,
    schema=PageLoad,
    concurrency=64,
    retries=3,
    timeout_s=900,
    on_failure=_page_load_failed,
    on_start=reconcile.at_start,
)
async def page_load(ctx: Context, event: PageLoad) -> None:
    spec = await load_viz_app(ctx, event.app)
    session = event.session if spec.sharing == "per_session" else None
    slot = session_slot(session) if session else SHARED
    key = slot_key(event.app, slot)
    subject = subjects.app_status(event.app, session)

    async with aclosing(cas_loop()) as tries:  # closed here, not by a task the loop schedules
        async for _ in tries:
            if await _serve(ctx, spec, event, session, slot, key, subject):
                return


async def _serve(
    ctx: Context,
    spec: AppSpec,
    event: PageLoad,
    session: str | None,
    slot: str,
    key: str,
    subject: str,
) -> bool:
    """One try at serving the load; False when the slot changed under us (try again)."""
    entry = await ctx.state.deployments.read(key)
    now = ctx.now()
    if entry is None or entry.value.state not in QUEUED_OR_LIVE:
        dep = Deployment(
            app=event.app,
            slot=slot,
            instance=new_instance_id(),
            state=AppState.PENDING,
            event_id=event.id,
            created_at=now,
            last_page_load=now,
            phases=Phases(requested=event.time),
            session=session,
            revision=spec.revision,
        )
        if entry is None:
            rev = await ctx.state.deployments.create(key, dep)
        else:
            rev = await ctx.state.deployments.update(key, dep, entry.revision)
        if rev is None:
            return False  # another page load won the slot: go round and report theirs
        ctx.log.info("viz_deployment_created", instance=dep.instance)
        await _bring_up(ctx, spec, key, dep, subject)
        return True

    dep = entry.value
    if dep.state == AppState.QUEUED:
        await _resume_queued(ctx, spec, event, key, dep, subject)
        return True
    if (
        slot == SHARED
        and dep.state == AppState.READY
        and rollout.older(dep.revision, spec.revision)
    ):
        await rollout.retire(ctx, key, entry)  # its viewers keep it; this load gets the new one
        return False
    if dep.event_id == event.id and dep.state != AppState.READY:
        ctx.log.info("viz_start_resumed", instance=dep.instance)
        await _bring_up(ctx, spec, key, dep, subject)
        return True
    await ctx.publish_status(subject, status_of(dep))
    # Recorded after the answer, off the page's path. The reaper may have begun to
    # stop the deployment as idle just before: it then sees this load and calls the
    # stop off, or it goes on and the read below sees it, and the next round here
    # starts one in its place. (A write skipped because this process finished one a
    # moment ago, `activity.record`, is covered by that write's own load.) The read
    # is made whether or not the write was: a deployment stopped for any reason
    # between the first read and the answer would otherwise be left with this
    # stale answer as its last status.
    await activity.record(ctx, key, activity.PAGE_LOAD)
    again = await ctx.state.deployments.read(key)
    return not (again and again.value.instance == dep.instance and again.value.state not in LIVE)


async def _bring_up(ctx: Context, spec: AppSpec, key: str, dep: Deployment, subject: str) -> None:
    """Make `dep` ready: from the warm pool if it has one, else by starting an instance.

    A new load first passes its limits (`handlers.capacity`); it may wait there, queued.
    """
    pending = dep.state == AppState.PENDING
    if pending and not await capacity.admit(ctx, spec, key, dep, subject, start=False):
        return
    if pools.keeps_pool(spec) and pending and await _from_pool(ctx, spec, key, dep, subject):
        return
    if pending and not await capacity.admit(ctx, spec, key, dep, subject, start=True):
        return

    def ours(d: Deployment) -> bool:
        return d.instance == dep.instance and d.state in LIVE

    def to_starting(d: Deployment) -> Deployment | None:
        scheduled = d.phases.scheduled or ctx.now()
        phases = d.phases.model_copy(update={"scheduled": scheduled})
        return (
            d.model_copy(update={"state": AppState.STARTING, "phases": phases}) if ours(d) else None
        )

    started = await mutate(ctx, key, to_starting)
    if started is None:
        return
    await ctx.publish_status(subject, status_of(started[0]))
    t_started, error, log_tail = await _start(ctx, spec, dep)
    if error is not None:
        await ctx.backend.stop_viz(dep.instance)
        update = {"state": AppState.FAILED, "error": error, "log_tail": log_tail}
        failed = await mutate(ctx, key, lambda d: d.model_copy(update=update) if ours(d) else None)
        ctx.log.warning(
            "viz_start_failed",
            instance=dep.instance,
            code=error.code,
            reason=error.message,
            log_tail=log_tail,
        )
        if failed:
            await ctx.publish_status(subject, status_of(failed[0]))
        await capacity.released(ctx, dep)
        return

    url = ctx.backend.url(dep.instance, spec)
    t_ready = ctx.now()

    observed = ctx.backend.phases(dep.instance)  # e.g. a pod's own times on Kubernetes

    def to_ready(d: Deployment) -> Deployment | None:
        times = {"started": t_started, "ready": t_ready} | observed
        phases = d.phases.model_copy(update=times)
        return (
            d.model_copy(update={"state": AppState.READY, "url": url, "phases": phases})
            if ours(d)
            else None
        )

    ready = await mutate(ctx, key, to_ready)
    if ready is None:
        await ctx.backend.stop_viz(dep.instance)  # reaped or replaced while starting
        return
    ctx.log.info(
        "viz_deployment_ready", instance=dep.instance, start_s=round(t_ready - dep.created_at, 3)
    )
    await ctx.publish_status(subject, status_of(ready[0]))


async def _start(
    ctx: Context, spec: AppSpec, dep: Deployment
) -> tuple[float, ErrorInfo | None, str | None]:
    """Start `dep`'s instance and wait for it to be ready: when it started, and why it failed
    (with the app's log tail) or None. Its place in the starts gate is given back however
    the start ends, also when starting raises (a missing secret, say)."""
    try:
        await ctx.backend.start_viz(dep.instance, spec)
        t_started = ctx.now()
        remaining = max(1.0, spec.start_timeout_s - (t_started - dep.created_at))
        try:
            await ctx.backend.wait_ready(dep.instance, spec, remaining)
        except StartFailed as exc:
            return t_started, ErrorInfo(code=exc.code, message=exc.message), exc.log_tail
        return t_started, None, None
    finally:
        await capacity.start_done(ctx, dep.instance)


async def _from_pool(ctx: Context, spec: AppSpec, key: str, dep: Deployment, subject: str) -> bool:
    """Serve `dep` with a warm instance. False if the pool was empty."""
    member = await pools.claim(ctx, spec.name, revision=spec.revision)
    if member is None:
        return False
    now = ctx.now()
    phases = dep.phases.model_copy(
        update={
            "scheduled": member.created_at,
            "started": member.created_at,
            "ready": now,
            "warm": True,
        }
    )
    update = {
        "instance": member.instance,
        "state": AppState.READY,
        "url": member.url,
        "phases": phases,
        "revision": member.revision,
    }
    ready = await mutate(
        ctx, key, lambda d: d.model_copy(update=update) if d.event_id == dep.event_id else None
    )
    if ready is None:
        await ctx.backend.stop_viz(member.instance)  # the slot moved on without us
        return True
    ctx.log.info("viz_deployment_ready", instance=member.instance, warm=True)
    await ctx.publish_status(subject, status_of(ready[0]))
    await pools.request_refill(ctx, spec, limit=1)
    return True


async def _resume_queued(
    ctx: Context, spec: AppSpec, event: PageLoad, key: str, dep: Deployment, subject: str
) -> None:
    """A page load for a queued slot (its viewer's again, or a wake-up when a place freed):
    serve it if it now passes its limits. Of concurrent ones, the first to move the record
    from `queued` serves it; the others leave it to that one."""
    if not await capacity.admit(ctx, spec, key, dep, subject, start=False):
        return
    if not pools.keeps_pool(spec) and not await capacity.admit(
        ctx, spec, key, dep, subject, start=True
    ):
        return
    now = ctx.now()
    update = {
        "state": AppState.PENDING,
        "event_id": event.id,
        "created_at": now,  # the instance's life (and start timeout) begins now
        "last_page_load": now,
        "revision": spec.revision,  # it starts now: the current revision
    }

    def admitted(d: Deployment) -> Deployment | None:
        ours = d.instance == dep.instance and d.state == AppState.QUEUED
        return d.model_copy(update=update) if ours else None

    moved = await mutate(ctx, key, admitted)
    if moved is not None:
        await _bring_up(ctx, spec, key, moved[0], subject)
