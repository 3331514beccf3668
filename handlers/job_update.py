"""job_update: turn a backend's report on a run into its record and status.

On success it checks the uploads against the app's declared outputs and
attaches presigned GET URLs. If object storage is down, it notes on the
run's record when the run exited (`exited_at`, so the reaper no longer
holds it to its deadline) and raises the store's retryable error with
`until` = that time + the app's `retention_s`: the report is tried again
with the growing backoff below (its last step, 60 s, repeats) for as long
as the results would be kept, and the run ends `succeeded` once the store
is back. Past that, the run ends `failed` (`unavailable`).
"""

from handlers import jobs, rollout
from handlers.context import Context
from handlers.errors import PermanentError, PublicError, RetryableError
from handlers.registry import handler
from schemas import errors as codes
from schemas import subjects
from schemas.errors import ErrorInfo
from schemas.events import JobUpdate
from schemas.spec import AppSpec
from schemas.status import JobState, ResultRef

# What the page reads when the store's own account of the mismatch is not public.
RESULTS_MISMATCH = "the run's uploads do not match its declared outputs"


@handler(
    subjects.JOB_UPDATE,
    schema=JobUpdate,
    concurrency=32,
    retries=10,
    backoff_s=(0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0),
    timeout_s=120,
    patient=True,
)
async def job_update(ctx: Context, event: JobUpdate) -> None:
    job = await jobs.load(ctx, event.job_id)
    if job.state.terminal:
        ctx.log.info("job_update_ignored", state=event.state, current=job.state)
        return
    state = JobState(event.state)
    now = ctx.now()
    if state == JobState.RUNNING:
        if job.state == JobState.RUNNING:
            return
        new = await jobs.advance(
            ctx,
            job.job_id,
            lambda j: (
                None  # ended, or reported running already (by run_start, for a warm start)
                if j.state.terminal or j.state == JobState.RUNNING
                else j.model_copy(  # its phases as they are now (run_start may write them)
                    update={"state": state, "phases": j.phases.model_copy(update={"running": now})}
                )
            ),
        )
    elif state == JobState.SUCCEEDED:
        fields = await _collect_or_wait(ctx, job, now)
        end = JobState.SUCCEEDED if "error" not in fields else JobState.FAILED
        new = await jobs.advance(
            ctx, job.job_id, lambda j: jobs.finish(j, end, now, exit_code=event.exit_code, **fields)
        )
    else:
        fields = {
            "error": jobs.failure(state, event.exit_code),
            "exit_code": event.exit_code,
            "log_tail": event.log_tail,
        }
        new = await jobs.advance(ctx, job.job_id, lambda j: jobs.finish(j, state, now, **fields))
    if new is not None:
        ctx.log.info("job_state_changed", state=new.state)
        await jobs.moved(ctx, new)


async def _collect_or_wait(ctx: Context, job: jobs.Job, now: float) -> dict:
    """`_collect`, or, while the store is away, note the exit and ask to be tried again.

    Raises:
        handlers.errors.RetryableError: the store did not answer; `until` is set to
            the end of the run's retention, counted from its exit.
    """
    try:
        return await _collect(ctx, job)
    except RetryableError as exc:
        exited_at = job.exited_at
        if exited_at is None:
            noted = await jobs.advance(
                ctx,
                job.job_id,
                lambda j: None if j.state.terminal else j.model_copy(update={"exited_at": now}),
            )
            exited_at = noted.exited_at if noted is not None else now
        exc.until = exited_at + job.retention_s
        if now < exc.until:
            ctx.log.warning(
                "job_results_waiting", error=exc.message, waiting_s=round(now - exited_at, 1)
            )
            raise
        ctx.log.error("job_results_abandoned", error=exc.message, retention_s=job.retention_s)
        return {"error": jobs.RESULTS_UNAVAILABLE}


async def _collect(ctx: Context, job: jobs.Job) -> dict:
    """Results for a run that exited 0, or an error if its uploads don't match its outputs."""
    try:
        results = await ctx.store.collect(job.job_id, job.outputs) if job.outputs else []
    except PermanentError as exc:  # missing or unexpected uploads: the run failed
        ctx.log.warning("job_results_rejected", code=exc.code, reason=exc.message)
        message = exc.message if isinstance(exc, PublicError) else RESULTS_MISMATCH
        return {"error": ErrorInfo(code=codes.BAD_RESULTS, message=message)}
    # How a page may show each result: the app's declared types and charts, read now (an
    # app removed since the run started still gets types from the file names).
    spec = await rollout.spec_shown(ctx, job.app, job.revision) if results else None
    shown = spec or AppSpec(name=job.app, kind="job", command=["-"], outputs=job.outputs)
    refs = [
        ResultRef(
            key=r.key,
            url=r.url,
            name=r.name,
            size=r.size,
            type=shown.media_type(r.name),
            chart=shown.charts.get(r.name),
        )
        for r in results
    ]
    return {"results": refs}
