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
    PENDING = "pending"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class Phases(BaseModel):
    """Unix times (seconds) at which a deployment reached each phase."""

    model_config = ConfigDict(extra="allow")

    requested: float | None = None
    scheduled: float | None = None
    started: float | None = None
    ready: float | None = None
    warm: bool = Field(False, description="True when the instance came from the warm pool")


class AppStatus(BaseModel):
    """Where an app's deployment is. `session` is set for per-session apps."""

    model_config = ConfigDict(extra="ignore")

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
    time: float = Field(default_factory=_time.time)
