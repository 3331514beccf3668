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

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.names import (
    APP_PATTERN,
    EVENT_ID_PATTERN,
    JOB_ID_PATTERN,
    SESSION_PATTERN,
    check_app,
    check_event_id,
    check_job_id,
    check_session,
    json_pattern,
)
from schemas.plain import NotPlainError, check_plain

EVENT_VERSION = 1
INPUTS_MAX_DEPTH = 32  # levels of objects and arrays in `inputs`, itself the first


def _pattern(pattern: str) -> dict[str, str]:
    """The JSON Schema of a field checked by one of `schemas.names`' patterns."""
    return {"pattern": json_pattern(pattern)}


def new_id(prefix: str = "ev") -> str:
    """A fresh random id such as `ev-3f2a...`."""
    return f"{prefix}-{uuid.uuid4().hex}"


class BaseEvent(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    v: Literal[1] = EVENT_VERSION
    id: str = Field(
        default_factory=new_id,
        description="De-duplication id, also the Nats-Msg-Id header; default: a fresh one",
        json_schema_extra=_pattern(EVENT_ID_PATTERN),
    )
    time: float = Field(
        default_factory=_time.time,
        description="Unix time, seconds; the gateway sets it to its own clock",
    )

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        return check_event_id(v)


class AppEvent(BaseEvent):
    app: str = Field(description="owner/title", json_schema_extra=_pattern(APP_PATTERN))
    session: str = Field(
        description="The viewer's session, chosen by the page",
        json_schema_extra=_pattern(SESSION_PATTERN),
    )

    @field_validator("app")
    @classmethod
    def _app(cls, v: str) -> str:
        return check_app(v)

    @field_validator("session")
    @classmethod
    def _session(cls, v: str) -> str:
        return check_session(v)


class PageLoad(AppEvent):
    """A page that shows the app was loaded."""

    type: Literal["page_load"] = "page_load"


class Heartbeat(AppEvent):
    """A page showing the app is still open. Counts only if visible, focused and recent."""

    type: Literal["heartbeat"] = "heartbeat"
    visible: bool
    focused: bool
    idle_s: float = Field(ge=0, description="Seconds since the viewer's last input")


class RunRequest(AppEvent):
    """Ask for one run of a job app with these inputs."""

    type: Literal["run_request"] = "run_request"
    inputs: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Plain JSON data, objects and arrays nested at most {INPUTS_MAX_DEPTH} "
        "levels (inputs itself the first); its msgpack size is limited by the app",
    )
    idempotency_key: str | None = Field(None, max_length=128)
    job_id: str | None = Field(
        None,
        description="Set by the gateway; else by the handler",
        json_schema_extra=_pattern(JOB_ID_PATTERN),
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

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, v: str | None) -> str | None:
        return v if v is None else check_job_id(v)


class RunCancel(BaseEvent):
    """Cancel a queued or running job."""

    type: Literal["run_cancel"] = "run_cancel"
    job_id: str = Field(json_schema_extra=_pattern(JOB_ID_PATTERN))
    app: str | None = Field(None, json_schema_extra=_pattern(APP_PATTERN))
    session: str | None = Field(None, json_schema_extra=_pattern(SESSION_PATTERN))

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, v: str) -> str:
        return check_job_id(v)

    @field_validator("app")
    @classmethod
    def _app(cls, v: str | None) -> str | None:
        return v if v is None else check_app(v)

    @field_validator("session")
    @classmethod
    def _session(cls, v: str | None) -> str | None:
        return v if v is None else check_session(v)


class ReaperTick(BaseEvent):
    """Periodic tick that makes the reaper do one pass. Published by the reaper's ticker."""

    type: Literal["reaper_tick"] = "reaper_tick"


class PoolRefill(BaseEvent):
    """Start one warm instance for an app's pool (published by the reaper)."""

    type: Literal["pool_refill"] = "pool_refill"
    app: str
    instance: str

    @field_validator("app")
    @classmethod
    def _app(cls, v: str) -> str:
        return check_app(v)


class JobUpdate(BaseEvent):
    """A backend saw a job change state (published by the backend watcher)."""

    type: Literal["job_update"] = "job_update"
    job_id: str = Field(json_schema_extra=_pattern(JOB_ID_PATTERN))
    state: Literal["running", "succeeded", "failed", "timed_out", "cancelled"]
    exit_code: int | None = None
    log_tail: str | None = None

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, v: str) -> str:
        return check_job_id(v)


Event = Annotated[
    PageLoad | Heartbeat | RunRequest | RunCancel | ReaperTick | PoolRefill | JobUpdate,
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
