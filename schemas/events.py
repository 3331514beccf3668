"""Events: what pages and spinyard itself publish for handlers to act on.

Every event has a `type`, an `id` (also the JetStream de-duplication id), a
`time` and a schema version `v`. App events also name the `app` and the
viewer's `session`. Ids and names are checked in full (`schemas.names`),
numbers must be finite, and a run's `inputs` must be plain data nesting at
most `INPUTS_MAX_DEPTH` levels, so whatever validates here can be encoded
again as msgpack and shown to a browser as JSON.
"""

import hashlib
import time as _time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from schemas.names import (
    APP_PATTERN,
    EVENT_ID_PATTERN,
    INSTANCE_ID_PATTERN,
    JOB_ID_PATTERN,
    SESSION_PATTERN,
    check_app,
    check_event_id,
    check_instance_id,
    check_job_id,
    check_session,
    json_pattern,
)
from schemas.plain import NotPlainError, check_plain

EVENT_VERSION = 1
INPUTS_MAX_DEPTH = 32  # levels of objects and arrays in `inputs`, itself the first


def _checked(pattern: str, check: Any) -> Any:
    """A string checked in full by one of `schemas.names`' checks, with its pattern in
    the JSON Schema (and so in the OpenAPI document)."""
    return Annotated[
        str, AfterValidator(check), Field(json_schema_extra={"pattern": json_pattern(pattern)})
    ]


AppName = _checked(APP_PATTERN, check_app)
SessionId = _checked(SESSION_PATTERN, check_session)
EventId = _checked(EVENT_ID_PATTERN, check_event_id)
JobId = _checked(JOB_ID_PATTERN, check_job_id)
InstanceId = _checked(INSTANCE_ID_PATTERN, check_instance_id)


def new_id(prefix: str = "ev") -> str:
    """A fresh random id such as `ev-3f2a...`."""
    return f"{prefix}-{uuid.uuid4().hex}"


class BaseEvent(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    v: Literal[1] = EVENT_VERSION
    id: EventId = Field(
        default_factory=new_id,
        description="De-duplication id, also the Nats-Msg-Id header; default: a fresh one",
    )
    time: float = Field(
        default_factory=_time.time,
        description="Unix time, seconds; the gateway sets it to its own clock",
    )


class AppEvent(BaseEvent):
    app: AppName = Field(description="owner/title")
    session: SessionId = Field(description="The viewer's session, chosen by the page")


class PageLoad(AppEvent):
    """A page that shows the app was loaded."""

    type: Literal["page_load"] = "page_load"


class Heartbeat(AppEvent):
    """A page showing the app is still open. Counts only if visible, focused and recent."""

    type: Literal["heartbeat"] = "heartbeat"
    visible: bool
    focused: bool
    idle_s: float = Field(ge=0, description="Seconds since the viewer's last input")
    instance: InstanceId | None = Field(
        None,
        description="The instance the page shows (from its status): after an update, a "
        "shared app's viewers on an older revision's instance keep it alive",
    )


class RunRequest(AppEvent):
    """Ask for one run of a job app with these inputs."""

    type: Literal["run_request"] = "run_request"
    inputs: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Plain JSON data, objects and arrays nested at most {INPUTS_MAX_DEPTH} "
        "levels (inputs itself the first); its msgpack size is limited by the app",
    )
    idempotency_key: str | None = Field(None, max_length=128)
    job_id: JobId | None = Field(None, description="Set by the gateway; else by the handler")
    revision: int | None = Field(
        None, ge=1, description="Run this published revision of the app (one still kept)"
    )

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, v: dict[str, Any]) -> dict[str, Any]:
        try:
            check_plain(v, max_depth=INPUTS_MAX_DEPTH)
        except NotPlainError as exc:
            where = f" (at {exc.where[:120]})" if exc.where else ""
            raise ValueError(f"{exc.reason}{where}") from None
        return v


class RunCancel(BaseEvent):
    """Cancel a queued or running job."""

    type: Literal["run_cancel"] = "run_cancel"
    job_id: JobId
    app: AppName | None = None
    session: SessionId | None = None


class ReaperTick(BaseEvent):
    """Periodic tick that makes the reaper do one pass. Published by the reaper's ticker."""

    type: Literal["reaper_tick"] = "reaper_tick"


class PoolRefill(BaseEvent):
    """Start one warm instance for an app's pool (published by the reaper)."""

    type: Literal["pool_refill"] = "pool_refill"
    app: AppName
    instance: str


class RunStart(BaseEvent):
    """Queue a accepted run and start what fits (published by run_request, and as a bare
    nudge, without `job_id`, when a run ends or the reaper finds a queue that can move)."""

    type: Literal["run_start"] = "run_start"
    app: AppName
    job_id: JobId | None = None
    record: dict[str, Any] | None = Field(
        None,
        description="The run's record as run_request created it (small inputs only), so the"
        " start need not read it; its compare-and-set finds a change since",
    )
    record_revision: int | None = Field(None, description="The KV revision `record` was written at")


class JobUpdate(BaseEvent):
    """A backend saw a job change state (published by the backend watcher)."""

    type: Literal["job_update"] = "job_update"
    job_id: JobId
    state: Literal["running", "succeeded", "failed", "timed_out", "cancelled"]
    exit_code: int | None = None
    log_tail: str | None = None


Event = Annotated[
    PageLoad | Heartbeat | RunRequest | RunCancel | ReaperTick | PoolRefill | RunStart | JobUpdate,
    Field(discriminator="type"),
]


def job_id_for(app: str, session: str, idempotency_key: str | None, event_id: str) -> str:
    """The job id of a run request: the same for the same app, session and idempotency key.

    Keys are scoped to the session, so two viewers who pick the same key get
    two runs. Without a key the id derives from the event id, so a redelivered
    request maps to the same job rather than starting a second one.
    """
    if idempotency_key:
        seed = f"{app}\0{session}\0key\0{idempotency_key}"
    else:
        seed = f"event\0{event_id}"
    return "j-" + hashlib.sha256(seed.encode()).hexdigest()[:24]
