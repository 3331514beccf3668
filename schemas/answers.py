"""What the gateway answers besides status and errors: an accepted event, the app list, health.

They are part of the public contract like the events: the gateway builds its
answers from these models, and its OpenAPI document describes them from the
same models.
"""

from typing import Any, Literal

from pydantic import BaseModel, Field


class Accepted(BaseModel):
    """`202` to `POST /v1/events`: the event is on the events stream."""

    id: str = Field(description="The event's id (the client's, or a fresh one)")
    time: float = Field(description="When the gateway accepted it, Unix seconds")
    job_id: str | None = Field(None, description="For a run request: the run's id")


class PoolSize(BaseModel):
    size: int = Field(description="Warm instances kept ready")


class AppSummary(BaseModel):
    """One entry of `GET /v1/apps`."""

    name: str = Field(description="owner/title")
    kind: Literal["viz", "job"]
    sharing: Literal["shared", "per_session"]
    pool: PoolSize
    description: str
    example_inputs: dict[str, Any] | None = Field(None, description="Job apps only")


class Health(BaseModel):
    """`GET /healthz`: 200 when the gateway reaches NATS, else 503."""

    ok: bool
    nats: bool = Field(description="Connected to NATS")


class DevToken(BaseModel):
    """`GET /v1/dev/token` (development only)."""

    token: str
    expires_in: int = Field(description="Seconds the token is valid")
