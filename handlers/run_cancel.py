"""run_cancel: stop a queued or running run and report it `cancelled`."""

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
        ctx.log.info("job_cancel_too_late", state=job.state)
        await jobs.publish(ctx, job)
        return
    await ctx.backend.cancel_job(event.job_id)
    done = await jobs.advance(
        ctx, event.job_id, lambda j: jobs.finish(j, JobState.CANCELLED, ctx.now())
    )
    if done is not None:
        ctx.log.info("job_cancelled")
        await jobs.publish(ctx, done)
