"""Runs (jobs): the record of one run, and its operations.

A run's record lives in the jobs bucket under its job id (see
`handlers.state`); run_request, run_cancel, job_update and reaper_tick share
these operations. Its state only moves forward: queued -> running -> one
terminal state; a late or repeated backend report for a finished run is ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from handlers import runq
from handlers.errors import Rejected
from schemas import errors as codes
from schemas import subjects
from schemas.errors import ErrorInfo
from schemas.spec import AppSpec
from schemas.status import JobPhases, JobState, JobStatus, ResultRef

if TYPE_CHECKING:  # the context holds the state, which holds these records
    from handlers.context import Context


def job_app(name: str, spec: AppSpec | None) -> AppSpec:
    """`spec`, just read as `name`'s, if it is a job app's. (A run records the revision it
    runs, `handlers.rollout`, so a run asked for right after a publish must see the new
    spec: CI publishes, then runs; `handlers.run_request` reads it afresh.)

    Raises:
        Rejected: no such app, or it is not a job app.
    """
    if spec is None:
        raise Rejected(f"no app named {name!r} is registered", code=codes.UNKNOWN_APP)
    if spec.kind != "job":
        raise Rejected(f"{name!r} is a {spec.kind} app, not a job app", code=codes.WRONG_KIND)
    return spec


class Job(BaseModel):
    """One run of a job app: what it was asked, where it is, how it ended."""

    job_id: str
    app: str
    session: str | None = None
    state: JobState
    event_id: str = Field(description="The run request that created it; its redelivery resumes it")
    inputs: dict[str, Any] = Field(default_factory=dict)
    outputs: list[str] = Field(default_factory=list)
    deadline_s: float
    retention_s: float
    created_at: float
    phases: JobPhases = Field(default_factory=JobPhases)
    results: list[ResultRef] = Field(default_factory=list)
    error: ErrorInfo | None = None
    exit_code: int | None = None
    log_tail: str | None = None
    exited_at: float | None = Field(
        None,
        description="When the backend said the run exited 0 and its results could not be"
        " collected yet (the store was away): from then on its retention, not its deadline,"
        " bounds the wait",
    )
    revision: int | None = Field(
        None,
        description="The app's revision it runs: the current one when accepted, or the one"
        " its request pinned (`handlers.rollout`)",
    )
    in_queue: bool = Field(
        True,
        description="Its start may have gone through its app's run queue (a limit applied),"
        " so its end frees its place there; False once it started with no limit to wait for",
    )


def status_of(job: Job) -> JobStatus:
    """The status pages see for `job`."""
    return JobStatus(
        job_id=job.job_id,
        app=job.app,
        state=job.state,
        results=job.results,
        error=job.error,
        exit_code=job.exit_code,
        log_tail=job.log_tail,
        phases=job.phases,
        session=job.session,
        revision=job.revision,
    )


async def publish(ctx: Context, job: Job) -> None:
    """Publish `job`'s status on its own subject."""
    await ctx.publish_status(subjects.job_status(job.job_id), status_of(job))


async def moved(ctx: Context, job: Job) -> None:
    """`job` has just changed state: publish its status, and if it ended, free its place
    in its app's run queue so the next run can start (`handlers.runq`)."""
    await publish(ctx, job)
    if job.state.terminal and job.in_queue:
        await runq.release(ctx, job.app, job.job_id)


async def load(ctx: Context, job_id: str) -> Job:
    """The run's record.

    Raises:
        Rejected: no run has that id.
    """
    job = await ctx.state.jobs.get(job_id)
    if job is None:
        raise Rejected(f"no run with id {job_id!r}", code=codes.NOT_FOUND)
    return job


async def advance(ctx: Context, job_id: str, change: Callable[[Job], Job | None]) -> Job | None:
    """Compare-and-set `change` on a run's record (see `Records.change`).

    Returns:
        The written record, or None if the run is gone or `change` declined.
    """
    entry = await ctx.state.jobs.change(job_id, change)
    return entry.value if entry else None


_ENDINGS = {
    JobState.FAILED: (codes.JOB_FAILED, "the run exited with an error"),
    JobState.TIMED_OUT: (codes.DEADLINE_EXCEEDED, "the run passed its deadline and was stopped"),
    JobState.CANCELLED: (codes.CANCELLED, "the run was cancelled"),
}


# A run that exited 0 whose results the store never gave back within their retention.
RESULTS_UNAVAILABLE = ErrorInfo(
    code=codes.UNAVAILABLE,
    message="the run's results could not be collected: storage was unavailable",
)


def failure(state: JobState, exit_code: int | None = None) -> ErrorInfo:
    """The error a run that ended in `state` (not succeeded) carries."""
    code, message = _ENDINGS[state]
    if state == JobState.FAILED and exit_code is not None:
        message = f"the run exited with code {exit_code}"
    return ErrorInfo(code=code, message=message)


def finish(job: Job, state: JobState, now: float, **fields: Any) -> Job | None:
    """`job` moved to terminal `state`, or None if it already ended."""
    if job.state.terminal:
        return None
    phases = job.phases.model_copy(update={"finished": now})
    return job.model_copy(update={"state": state, "phases": phases, **fields})
