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
from schemas.spec import AppSpec
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
    job_id = event.job_id or job_id_for(event.app, event.session, event.idempotency_key, event.id)
    size = codec.packed_size(event.inputs)
    job, written = await _create(ctx, event, job_id, size)
    start_subject = subjects.event(subjects.RUN_START, event.app)
    if written is not None:
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


async def _create(
    ctx: Context, event: RunRequest, job_id: str, size: int
) -> tuple[jobs.Job, int | None]:
    """Create the run's record, `queued`: the record and its revision (None if it existed).

    The spec it is made from is read afresh (a run records the revision it
    runs: CI publishes, then runs). If this process read it a moment ago
    (`handlers.memo`), the record is made from that one and the spec is read
    beside the create, one round trip instead of two; a spec that changed
    meanwhile (a publish the watch had not passed on yet) makes the record
    anew from it, or fails the run if it refuses it.

    Raises:
        Rejected: no such job app, revision or kind, or inputs too large.
    """
    remembered = ctx.memo.remembered(event.app) if event.revision is None else None
    if (
        not isinstance(remembered, AppSpec)
        or remembered.kind != "job"
        or size > remembered.max_input_bytes  # refused on the spec as it is, not as it was
    ):
        spec = jobs.job_app(event.app, await ctx.state.apps.get(event.app))
        ctx.memo.remember(event.app, spec)
        if event.revision is not None:  # a pinned revision's spec, from the app's history
            spec = await rollout.spec_of_run(ctx, spec, event.revision)
        job = _queued(event, job_id, _fits(event, spec, size), ctx.now())
        return job, await ctx.state.jobs.create(job_id, job)
    job = _queued(event, job_id, remembered, ctx.now())
    written, read = await asyncio.gather(
        ctx.state.jobs.create(job_id, job), ctx.state.apps.get(event.app)
    )
    if read == remembered:
        return job, written
    ctx.memo.forget(event.app)  # changed since: made anew from the spec as it is
    spec = _fits(event, jobs.job_app(event.app, read), size)  # (a refusal fails the run)
    job = _queued(event, job_id, spec, job.created_at)
    if written is not None:
        written = await ctx.state.jobs.update(job_id, job, written)
    return job, written


def _fits(event: RunRequest, spec: AppSpec, size: int) -> AppSpec:
    """`spec`, if it is a job app's that takes inputs of `size` packed bytes.

    Raises:
        Rejected: it is a pinned revision of another kind, or the inputs are too large.
    """
    if spec.kind != "job":
        message = f"revision {event.revision} of {event.app!r} is a {spec.kind} app"
        raise Rejected(message, code=codes.WRONG_KIND)
    if size > spec.max_input_bytes:
        raise Rejected(
            f"inputs are {size} bytes; {event.app} accepts at most {spec.max_input_bytes}",
            code=codes.TOO_LARGE,
        )
    return spec


def _queued(event: RunRequest, job_id: str, spec: AppSpec, now: float) -> jobs.Job:
    """The record of a run of `spec` accepted at `now`, `queued`."""
    return jobs.Job(
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
