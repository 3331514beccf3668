"""Events: what pages and spinyard itself publish for handlers to act on.

Every event has a `type`, an `id` (also the JetStream de-duplication id), a
`time` and a schema version `v`. App events also name the `app` and the
viewer's `session`.
"""

import hashlib
import time as _time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.names import check_app, check_session

EVENT_VERSION = 1


def new_id(prefix: str = "ev") -> str:
    """A fresh random id such as `ev-3f2a...`."""
    return f"{prefix}-{uuid.uuid4().hex}"


class BaseEvent(BaseModel):
    model_config = ConfigDict(extra="ignore")

    v: Literal[1] = EVENT_VERSION
    id: str = Field(default_factory=new_id, min_length=1, max_length=80)
    time: float = Field(default_factory=_time.time, description="Unix time, seconds")


class AppEvent(BaseEvent):
    app: str
    session: str

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
    inputs: dict[str, Any] = Field(default_factory=dict)
    idempotency_key: str | None = Field(None, max_length=128)
    job_id: str | None = Field(None, description="Set by the gateway; else by the handler")


class RunCancel(BaseEvent):
    """Cancel a queued or running job."""

    type: Literal["run_cancel"] = "run_cancel"
    job_id: str
    app: str | None = None
    session: str | None = None


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
    job_id: str
    state: Literal["running", "succeeded", "failed", "timed_out", "cancelled"]
    exit_code: int | None = None
    log_tail: str | None = None


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
