"""Status: what spinyard tells pages about apps and runs.

Status is published on JetStream with one message kept per subject, so a
subscriber that comes late still gets the current state first.
"""

import time as _time
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.errors import ErrorInfo

STATUS_VERSION = 1


class AppState(StrEnum):
    QUEUED = "queued"  # behind a limit (docs/app-spec.md#instance-limits); `position` says where
    PENDING = "pending"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class Phases(BaseModel):
    """Unix times (seconds) at which a deployment reached each phase."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    requested: float | None = None
    scheduled: float | None = None
    started: float | None = None
    ready: float | None = None
    warm: bool = Field(False, description="True when the instance came from the warm pool")


class AppStatus(BaseModel):
    """Where an app's deployment is. `session` is set for per-session apps."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    v: Literal[1] = STATUS_VERSION
    app: str
    state: AppState
    url: str | None = None
    phases: Phases = Field(default_factory=Phases)
    error: ErrorInfo | None = None
    session: str | None = None
    instance: str | None = None
    reason: str | None = Field(
        None, description="Why it stopped: idle_heartbeat, max_lifetime, ..."
    )
    log_tail: str | None = Field(
        None, description="On a failed start: the last lines of the app's own log"
    )
    position: int | None = Field(
        None, description="While queued behind a limit: 1 = the next to be served"
    )
    revision: int | None = Field(
        None, description="The app's published revision the instance runs (null: unknown)"
    )
    time: float = Field(default_factory=_time.time)


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def terminal(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


class Chart(BaseModel):
    """A line chart of a CSV output: one column along x, one line per y column."""

    model_config = ConfigDict(extra="forbid")

    x: str = Field(min_length=1, description="The column along the x axis")
    y: list[str] = Field(min_length=1, max_length=8, description="One line per column")


class ResultRef(BaseModel):
    """One result object of a run: its key in the results bucket and a presigned GET URL,
    and how a page may show it (`type`, and a `chart` for a CSV the app declared one for)."""

    key: str
    url: str
    name: str | None = None
    size: int | None = None
    type: str | None = Field(None, description="Media type, e.g. text/csv or image/png")
    chart: Chart | None = None


class JobPhases(BaseModel):
    """Unix times (seconds) at which a run reached each phase."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    queued: float | None = None
    started: float | None = None  # its start was handed to the backend
    running: float | None = None
    finished: float | None = None
    warm: bool = Field(False, description="True when the run started on a warm runner")


class JobStatus(BaseModel):
    """Where a run is. `results` is set on success, `log_tail` on failure."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    v: Literal[1] = STATUS_VERSION
    job_id: str
    app: str
    state: JobState
    results: list[ResultRef] = Field(default_factory=list)
    error: ErrorInfo | None = None
    exit_code: int | None = None
    log_tail: str | None = None
    phases: JobPhases = Field(default_factory=JobPhases)
    session: str | None = None
    position: int | None = Field(
        None, description="While queued behind a limit: 1 = the next to start"
    )
    revision: int | None = Field(
        None, description="The app's published revision the run runs (null: unknown)"
    )
    time: float = Field(default_factory=_time.time)
