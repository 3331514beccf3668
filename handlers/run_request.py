"""run_request: accept a run of a job app, record it as queued, and ask for its start.

The job id comes from the request (the gateway sets it) or is derived from
the app and idempotency key, so a repeated key yields the existing run. The
record is created with a KV create, so of any number of deliveries of
requests for one job id only one is accepted; a redelivery of that same
request asks for the start again (de-duplicated by the job id). The start
itself, under the app's limits, is run_start's (`handlers.run_start`), so
accepting runs as fast as the bus allows whatever the start rate. The ask
for the start carries the record as created, with its revision, when the
inputs are small (`CARRIED_INPUT_BYTES`): run_start starts an unlimited
app's run from it without reading it.

A run records the app's revision it runs: the current one, or the kept one
its request pins (`revision`); it starts with that revision's spec
(`handlers.rollout`). A pinned revision not kept fails `unknown_revision`.
"""

import asyncio

from handlers import jobs, rollout
from handlers.context import Context
from handlers.errors import Rejected
from handlers.registry import handler
from schemas import codec, subjects
from schemas import errors as codes
from schemas.errors import ErrorInfo
from schemas.events import RunRequest, RunStart, job_id_for
from schemas.status import JobPhases, JobState, JobStatus


async def _run_request_failed(ctx: Context, event: RunRequest, error: ErrorInfo) -> None:
    """Tell the page why its run did not start, on the run's own status subject."""
    job_id = event.job_id or job_id_for(event.app, event.session, event.idempotency_key, event.id)
    if await ctx.state.jobs.get(job_id) is not None:
        done = await jobs.advance(
            ctx, job_id, lambda j: jobs.finish(j, JobState.FAILED, ctx.now(), error=error)
        )
        if done is not None:
            await jobs.moved(ctx, done)
        return
    status = JobStatus(
        job_id=job_id, app=event.app, state=JobState.FAILED, error=error, session=event.session
    )
    await ctx.publish_status(subjects.job_status(job_id), status)


# A run whose inputs pack to at most this many bytes travels to run_start with its record.
CARRIED_INPUT_BYTES = 16 * 2**10


@handler(
    subjects.RUN_REQUEST,
    schema=RunRequest,
    concurrency=32,
    retries=4,
    timeout_s=120,
    on_failure=_run_request_failed,
)
async def run_request(ctx: Context, event: RunRequest) -> None:
    spec = await jobs.load_job_app(ctx, event.app)
    if event.revision is not None:  # a pinned revision's spec, from the app's history
        spec = await rollout.spec_of_run(ctx, spec, event.revision)
        if spec.kind != "job":
            message = f"revision {event.revision} of {event.app!r} is a {spec.kind} app"
            raise Rejected(message, code=codes.WRONG_KIND)
    size = codec.packed_size(event.inputs)
    if size > spec.max_input_bytes:
        raise Rejected(
            f"inputs are {size} bytes; {event.app} accepts at most {spec.max_input_bytes}",
            code=codes.TOO_LARGE,
        )
    job_id = event.job_id or job_id_for(event.app, event.session, event.idempotency_key, event.id)
    now = ctx.now()
    job = jobs.Job(
        job_id=job_id,
        app=event.app,
        session=event.session,
        state=JobState.QUEUED,
        event_id=event.id,
        inputs=event.inputs,
        outputs=spec.outputs,
        deadline_s=spec.deadline_s,
        retention_s=spec.retention_s,
        created_at=now,
        phases=JobPhases(queued=now),
        revision=spec.revision,
    )
    start_subject = subjects.event(subjects.RUN_START, event.app)
    if (written := await ctx.state.jobs.create(job_id, job)) is not None:
        ctx.log.info("job_queued", job_id=job_id)
        start = RunStart(app=event.app, job_id=job_id)
        if size <= CARRIED_INPUT_BYTES:  # run_start starts from it: a read fewer
            start.record, start.record_revision = job.model_dump(mode="json"), written
        # `queued` and the ask for its start go out together, in this order on one
        # connection (a round trip, not two): `queued` is stored before run_start hears of
        # the run. Its start is run_start's: acceptance does not wait for it (or a slot).
        await asyncio.gather(
            jobs.publish(ctx, job), ctx.emit(start_subject, start, msg_id=f"start-{job_id}")
        )
        return
    existing = await jobs.load(ctx, job_id)
    if existing.event_id != event.id or existing.state != JobState.QUEUED:
        # The same idempotency key again: the page gets the run's current status.
        ctx.log.info("job_request_repeated", job_id=job_id, state=existing.state)
        await jobs.publish(ctx, existing)
        return
    ctx.log.info("job_start_resumed", job_id=job_id)
    # Its start is run_start's: acceptance does not wait for it (or for a free slot).
    start = RunStart(app=event.app, job_id=job_id)
    await ctx.emit(start_subject, start, msg_id=f"start-{job_id}")
