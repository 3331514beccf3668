"""run_start: put an accepted run in its app's queue, then start every waiting run that fits.

The queue, its limits and its fair order are in `handlers.runq`. A
`run_start` names the run run_request accepted; a bare one (no job id) is a
nudge, sent when a run ends or by the reaper, that only starts what fits.
The handler claims runs in the queue by compare-and-set (the claim names this
event), then hands each claimed run to the backend; a redelivery hands this
event's claims out again, which backends treat as a no-op for a run they have.
"""

import asyncio
from collections.abc import Callable

from handlers import jobs, pools, rollout, runq
from handlers.context import Context
from handlers.errors import PermanentError, Rejected, RetryableError, public_info
from handlers.ports import JobLaunch, WarmHandOver
from handlers.registry import handler
from handlers.state import Entry, Turn, cas_loop
from schemas import errors as codes
from schemas import subjects
from schemas.errors import ErrorInfo
from schemas.events import RunStart
from schemas.spec import AppSpec
from schemas.status import JobState

CARRIED_FOR_S = 2.0  # a start event older than this reads its run's record afresh
QUEUE_FULL = "{app} has {n} runs waiting, as many as it queues (max_queued_runs); try later"


async def _fail(ctx: Context, job_id: str, error: ErrorInfo) -> None:
    """End a run that will not start `failed`, tell its page, and free its place."""
    done = await jobs.advance(
        ctx, job_id, lambda j: jobs.finish(j, JobState.FAILED, ctx.now(), error=error)
    )
    if done is not None:
        await jobs.moved(ctx, done)


async def _start_failed(ctx: Context, event: RunStart, error: ErrorInfo) -> None:
    """The start of this event's runs failed for good: they end `failed`."""
    queue = await ctx.state.queues.get(event.app)
    claimed = [j for j, c in (queue.claimed if queue else {}).items() if c.by == event.id]
    for job_id in {*claimed, *([event.job_id] if event.job_id else [])}:
        await _fail(ctx, job_id, error)


@handler(
    subjects.RUN_START,
    schema=RunStart,
    concurrency=16,
    retries=4,
    timeout_s=120,
    on_failure=_start_failed,
)
async def run_start(ctx: Context, event: RunStart) -> None:
    spec, read = await _spec_and_run(ctx, event)
    if spec is None or spec.kind != "job":
        if event.job_id:
            info = ErrorInfo(code=codes.UNKNOWN_APP, message=f"{event.app} is not registered")
            await _fail(ctx, event.job_id, info)
        return
    job = read.value if read and read.value.state == JobState.QUEUED else None
    # (None: cancelled while the start was on its way, or started already)
    if job is not None and not runq.limited(spec, ctx.knobs.run_slots):
        # Nothing to wait for: it starts now, with no queue record to change (`runq.limited`).
        if await _start(ctx, spec, job.job_id, read, in_queue=False):
            await pools.request_refill(ctx, spec, limit=1, unless_starting=True)
        return
    before, after, full = await _claim(ctx, spec, job, event.id)
    if full and job is not None:
        message = QUEUE_FULL.format(app=spec.name, n=len(before.waiting))
        await _fail(ctx, job.job_id, ErrorInfo(code=codes.TOO_MANY, message=message))
    await runq.publish_moves(ctx, spec.name, before, after)
    took_warm = False
    for job_id, c in after.claimed.items():
        if c.by == event.id:
            took_warm |= await _start(ctx, spec, job_id, read if job_id == event.job_id else None)
    if took_warm:  # once per event, after its starts: a burst's starts come first
        await pools.request_refill(ctx, spec, limit=1, unless_starting=True)


async def _spec_and_run(
    ctx: Context, event: RunStart
) -> tuple[AppSpec | None, Entry[jobs.Job] | None]:
    """The app's spec and the run's record (None for a nudge, or if it is gone).

    For a run of an app without limits, the record is the one run_request
    carried in the event (`_carried`), and the spec the one this process
    remembers (`handlers.memo`) if it is the revision the run records: no read.
    A carried record that changed since is found by the start's first
    compare-and-set on it. A run that goes through its app's queue is read:
    the queue must not take in a run that ended meanwhile. Otherwise both are
    read at once, one round trip.
    """
    if not event.job_id:
        return await ctx.state.apps.get(event.app), None
    carried = _carried(ctx, event)
    if carried is None:
        return await asyncio.gather(
            ctx.state.apps.get(event.app), ctx.state.jobs.read(event.job_id)
        )
    spec = await ctx.memo.spec(event.app, ctx.state.apps.get)
    if spec is not None and spec.revision != carried.value.revision:  # changed: read it
        spec = await ctx.state.apps.get(event.app)
    if spec is not None and spec.kind == "job" and runq.limited(spec, ctx.knobs.run_slots):
        return spec, await ctx.state.jobs.read(event.job_id)
    return spec, carried


def _carried(ctx: Context, event: RunStart) -> Entry[jobs.Job] | None:
    """The record run_request carried in `event`, unless the event is older than
    `CARRIED_FOR_S` (a redelivery: the run may have moved on since) or carries none."""
    if event.record is None or not event.record_revision or not event.job_id:
        return None
    if not 0 <= ctx.now() - event.time < CARRIED_FOR_S:
        return None
    job = jobs.Job.model_validate(event.record)
    if (job.job_id, job.app) != (event.job_id, event.app):
        return None
    return Entry(event.job_id, job, event.record_revision)


async def _claim(
    ctx: Context, spec: AppSpec, job: jobs.Job | None, by: str
) -> tuple[runq.RunQueue, runq.RunQueue, bool]:
    """Add `job` to the queue (unless it is there or the queue is full) and claim what fits.

    Returns:
        The queue before and after, and whether `job` found the queue full.
    """
    now = ctx.now()
    async with ctx.state.queues.turn(spec.name) as turn:  # see `Records.turn`
        return await _claim_in_turn(ctx, spec, job, by, now, turn)


async def _claim_in_turn(
    ctx: Context, spec: AppSpec, job: jobs.Job | None, by: str, now: float, turn: Turn
) -> tuple[runq.RunQueue, runq.RunQueue, bool]:
    guess = ctx.state.queues.guess(spec.name, turn)  # the claim before ours wrote it
    turn.last = None
    async for _ in cas_loop():
        guessed = guess is not None
        entry, guess = guess or await ctx.state.queues.read(spec.name), None
        queue = entry.value if entry else runq.RunQueue()
        new, full = queue, False
        if (
            job is not None
            and job.job_id not in queue.claimed
            and not any(w.job_id == job.job_id for w in queue.waiting)
        ):
            if len(queue.waiting) >= spec.max_queued_runs:
                full = True
            else:
                waiting = runq.Waiting(
                    job_id=job.job_id,
                    session=job.session,
                    queued_at=job.phases.queued or job.created_at,
                )
                # In the order runs were accepted (their run_starts may come in any order).
                ordered = sorted([*queue.waiting, waiting], key=lambda w: w.queued_at)
                new = runq.RunQueue(waiting=ordered, claimed=queue.claimed)
        chosen = runq.startable(new, spec.max_concurrent_runs, spec.max_runs_per_session)
        slotted = set(await runq.take_slots(ctx, spec.name, [w.job_id for w in chosen]))
        chosen = [w for w in chosen if w.job_id in slotted]
        if chosen:
            new = runq.claim(new, chosen, by, now)
        if new is queue:
            if guessed:  # nothing to do, by what we did not read: decide again on the record
                continue
            return queue, queue, full
        if entry is None:
            written = await ctx.state.queues.create(spec.name, new)
        else:
            written = await ctx.state.queues.update(spec.name, new, entry.revision)
        if written is not None:
            ctx.state.queues.remember(turn, new, written)
            return queue, new, full
        await runq.free_slots(ctx, slotted)  # lost the race: the slots were for nothing
    raise RetryableError(f"the run queue of {spec.name} kept changing under us", delay=0.2)


async def _start(
    ctx: Context,
    spec: AppSpec,
    job_id: str,
    known: Entry[jobs.Job] | None = None,
    *,
    in_queue: bool = True,
) -> bool:
    """Hand one claimed run to the backend (again, on a redelivery: a no-op there).

    A run of another revision than the current one starts cold, with that
    revision's spec; warm runners run the current one (`handlers.rollout`).

    `known` is the run's record as read before the claim, if it was: its writes
    here then start from it (one round trip fewer each, unless it changed since).
    `in_queue=False`: it was not claimed in its app's queue (no limit), and its
    record says so, so its end leaves the queue alone.

    Returns whether it took a warm runner from the app's pool.
    """
    current = spec.revision
    entry = known or await ctx.state.jobs.read(job_id)
    job = entry.value if entry else None
    if job is None or job.state != JobState.QUEUED:
        if (job is None or job.state.terminal) and in_queue:  # it ended while claimed
            await runq.release(ctx, spec.name, job_id)
        return False
    now = ctx.now()
    member = None
    try:
        spec = await rollout.spec_of_run(ctx, spec, job.revision)
    except Rejected as exc:  # its revision is no longer kept: this run fails, the others start
        await _fail(ctx, job_id, public_info(exc))
        return False
    if job.phases.started is None:
        if pools.keeps_pool(spec) and ctx.backend.warm_runners and spec.revision == current:
            member = await pools.claim(
                ctx, spec.name, used_at=now, revision=spec.revision, exact=True
            )
        if member is None:
            entry = await ctx.state.jobs.change(job_id, _started(now, False, in_queue), known=entry)
            if entry is None:
                return False
    urls = ctx.store.upload_urls(job_id, spec.outputs) if spec.outputs and ctx.store else {}
    launch = JobLaunch(
        job_id=job_id, inputs=job.inputs, upload_urls=urls, deadline_s=spec.deadline_s
    )
    try:
        handed: WarmHandOver | None = None
        written, at = None, None
        if member is not None:
            handed = await ctx.backend.submit_warm(launch, spec, member.instance)
            at = ctx.now() if handed == "running" else None  # one write: started and running
            if handed is None:  # it died since the claim: start cold
                mark = _started(now, False, in_queue)
            else:  # "taken": the backend reports its start
                mark = _handed(now, at, in_queue)
            written = await ctx.state.jobs.change(job_id, mark, known=entry)
        if handed is None:
            if member is not None:
                ctx.log.warning("warm_runner_lost", job_id=job_id, instance=member.instance)
            await ctx.backend.submit_job(launch, spec)
    except PermanentError as exc:  # this run's start failed; the others still start
        ctx.log.warning("job_start_failed", job_id=job_id, error=exc.message)
        await _fail(ctx, job_id, public_info(exc))
        return member is not None
    if handed == "running" and written and written.value.phases.running == at:  # ours
        await jobs.moved(ctx, written.value)  # no wait for the backend's report
        now_job: jobs.Job | None = written.value
    else:  # read after the start: a cancel that came meanwhile is seen here
        now_job = await ctx.state.jobs.get(job_id)
    if now_job is None or now_job.state.terminal:  # cancelled while it was being started
        await ctx.backend.cancel_job(job_id)
        ctx.log.info("job_start_undone", job_id=job_id)
        return member is not None
    ctx.log.info("job_submitted", job_id=job_id, warm=member is not None)
    return member is not None


def _started(now: float, warm: bool, in_queue: bool) -> Callable[[jobs.Job], jobs.Job | None]:
    """The change that records a queued run's start as handed to the backend (and whether
    warm); the backend then reports it running."""

    def mark(job: jobs.Job) -> jobs.Job | None:
        if job.state != JobState.QUEUED:
            return None
        phases = job.phases.model_copy(update={"started": job.phases.started or now, "warm": warm})
        return job.model_copy(update={"phases": phases, "in_queue": in_queue})

    return mark


def _handed(
    now: float, running: float | None, in_queue: bool
) -> Callable[[jobs.Job], jobs.Job | None]:
    """The change that records a run handed to a warm runner: started, warm, and (`running`
    given: the runner said its model started) running. The backend's report of the
    start may come first (it reports what it sees; a pod's phase, say): the run then
    only gains what this adds. The report that follows a start written here changes
    nothing (`job_update`)."""

    def mark(job: jobs.Job) -> jobs.Job | None:
        if job.state not in (JobState.QUEUED, JobState.RUNNING):
            return None  # ended (cancelled, or it was quick)
        update: dict = {"started": job.phases.started or now, "warm": True}
        state = job.state
        if running is not None and state == JobState.QUEUED:
            state, update["running"] = JobState.RUNNING, running
        phases = job.phases.model_copy(update=update)
        if (state, phases, in_queue) == (job.state, job.phases, job.in_queue):
            return None
        return job.model_copy(update={"state": state, "phases": phases, "in_queue": in_queue})

    return mark
