"""What the gateway answers besides status and errors: an accepted event, the app list, health.

They are part of the public contract like the events: the gateway builds its
answers from these models, and its OpenAPI document describes them from the
same models.
"""

from typing import Any, Literal

from pydantic import BaseModel, Field

from schemas.schedule import Window


class Accepted(BaseModel):
    """`202` to `POST /v1/events`: the event is on the events stream."""

    id: str = Field(description="The event's id (the client's, or a fresh one)")
    time: float = Field(description="When the gateway accepted it, Unix seconds")
    job_id: str | None = Field(None, description="For a run request: the run's id")


class PoolSize(BaseModel):
    size: int = Field(description="Warm instances kept ready outside the schedule's windows")
    schedule: list[Window] | None = Field(
        None, description="The spec's scheduled pool sizes (docs/app-spec.md), if it has any"
    )
    now: int | None = Field(
        None, description="With a schedule: the pool size it asks for at the gateway's clock"
    )


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


class Published(BaseModel):
    """`201`/`200` to `PUT /v1/apps/{owner}/{title}` and `POST .../rollback`."""

    name: str = Field(description="owner/title (the contract's name for it)")
    app: str = Field(description="owner/title, as in every other answer")
    revision: int = Field(description="The app's current revision (only ever grows)")
    digest: str = Field(description="sha256 of the submitted spec's canonical JSON")
    changed: bool = Field(description="False if the spec was already current: nothing written")


class AppRevision(BaseModel):
    """One entry of `GET /v1/apps/{owner}/{title}/revisions`."""

    revision: int
    published_by: str | None = Field(description="The publisher token's `sub`, if it had one")
    published_at: float = Field(description="Unix seconds")
    digest: str


class RevisionList(BaseModel):
    """`GET /v1/apps/{owner}/{title}/revisions`: the revisions kept, oldest first."""

    app: str
    current: int = Field(description="The current revision; 0 if the app is removed")
    revisions: list[AppRevision]


class PublishedSpec(BaseModel):
    """`GET /v1/apps/{owner}/{title}`: the current spec, as validated (presets expanded)."""

    app: str
    revision: int | None = Field(
        description="The current revision; null for an app registered over NATS "
        "(`spinyard apps add` without a gateway), which has no history"
    )
    digest: str | None
    spec: dict[str, Any] = Field(description="The app spec (docs/app-spec.md)")


class Rollback(BaseModel):
    """The body of `POST /v1/apps/{owner}/{title}/rollback`."""

    model_config = {"extra": "forbid"}

    revision: int = Field(ge=1, description="The earlier revision to make current again")


class SecretSet(BaseModel):
    """`201`/`200` to `PUT /v1/apps/{owner}/{title}/secrets/{name}`: never the value."""

    app: str
    name: str
    created: bool = Field(description="True if the secret is new, False if its value was replaced")


class SecretNames(BaseModel):
    """`GET /v1/apps/{owner}/{title}/secrets`: the names of an app's secrets, never values."""

    app: str
    names: list[str] = Field(description="Sorted")
