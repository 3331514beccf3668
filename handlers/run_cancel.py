"""run_cancel: stop a queued or running run and report it `cancelled`.

The verdict is written before the backend is told: a start racing with the
cancel (run_start) reads the record after handing the run to the backend and
stops it itself, and the backend's own `cancelled` report finds the run ended.
A redelivery after a crash between the two tells the backend again.
"""

from handlers import jobs
from handlers.context import Context
from handlers.registry import handler
from schemas import subjects
from schemas.events import RunCancel
from schemas.status import JobState


@handler(subjects.RUN_CANCEL, schema=RunCancel, concurrency=16, retries=4, timeout_s=60)
async def run_cancel(ctx: Context, event: RunCancel) -> None:
    job = await jobs.load(ctx, event.job_id)
    if job.state.terminal:
        if job.state == JobState.CANCELLED:
            await ctx.backend.cancel_job(event.job_id)  # in case a crash came between
        ctx.log.info("job_cancel_too_late", state=job.state)
        await jobs.publish(ctx, job)
        return
    done = await jobs.advance(
        ctx, event.job_id, lambda j: jobs.finish(j, JobState.CANCELLED, ctx.now())
    )
    await ctx.backend.cancel_job(event.job_id)
    if done is not None:
        ctx.log.info("job_cancelled")
        await jobs.moved(ctx, done)
