"""Viz deployments: the record of an instance serving a slot, and its operations.

A deployment serves one slot of a viz app: the app's shared slot, or one
session's. Its record lives in the deployments bucket under its slot key
(`owner.title.shared`, `owner.title.session.<sid>`; see `handlers.state`).
page_load, heartbeat and reaper_tick share these operations; every change
to a record goes through `mutate`, a compare-and-set loop, so concurrent
page loads, heartbeats and reaper passes never overwrite each other's fields.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from handlers.errors import Rejected
from schemas import errors as codes
from schemas import subjects
from schemas.errors import ErrorInfo
from schemas.spec import AppSpec
from schemas.status import AppState, AppStatus, Phases

if TYPE_CHECKING:  # the context holds the state, which holds these records
    from handlers.context import Context

SHARED = "shared"
LIVE = (AppState.PENDING, AppState.STARTING, AppState.READY)


class Deployment(BaseModel):
    """A viz instance serving a slot: the shared slot, or one session's."""

    app: str
    slot: str
    instance: str
    state: AppState
    url: str | None = None
    event_id: str = Field(description="The page load that created it; its redelivery resumes it")
    created_at: float
    last_page_load: float
    last_heartbeat: float | None = None
    phases: Phases = Field(default_factory=Phases)
    error: ErrorInfo | None = None
    log_tail: str | None = None  # of a failed start: the app's last log lines
    session: str | None = None


def slot_key(app: str, slot: str) -> str:
    """The KV key of `app`'s deployment in `slot` (`SHARED`, or `session_slot(...)`)."""
    return f"{subjects.app_key(app)}.{slot}"


def session_slot(session: str) -> str:
    """The slot of one session's own instance of a per-session app."""
    return f"session.{session}"


def new_instance_id() -> str:
    """A fresh instance id with 64 random bits: its URL is hard to guess."""
    return f"i-{secrets.token_hex(8)}"


async def load_viz_app(ctx: Context, name: str) -> AppSpec:
    """The app's spec.

    Raises:
        Rejected: no such app, or it is not a viz app.
    """
    spec = await ctx.state.apps.get(name)
    if spec is None:
        raise Rejected(f"no app named {name!r} is registered", code=codes.UNKNOWN_APP)
    if spec.kind != "viz":
        raise Rejected(f"{name!r} is a {spec.kind} app, not a viz app", code=codes.WRONG_KIND)
    return spec


def status_of(dep: Deployment, **extra) -> AppStatus:
    """The status pages see for `dep` (its URL only once ready)."""
    return AppStatus(
        app=dep.app,
        state=dep.state,
        url=dep.url if dep.state == AppState.READY else None,
        phases=dep.phases,
        error=dep.error,
        log_tail=dep.log_tail if dep.state == AppState.FAILED else None,
        session=dep.session,
        instance=dep.instance,
        **extra,
    )


def status_subject(dep: Deployment) -> str:
    return subjects.app_status(dep.app, dep.session)


async def mutate(
    ctx: Context, key: str, change: Callable[[Deployment], Deployment | None]
) -> tuple[Deployment, int] | None:
    """Compare-and-set `change` on the deployment at `key` (see `Records.change`).

    Returns:
        The written record and its revision, or None if absent or `change` declined.
    """
    entry = await ctx.state.deployments.change(key, change)
    return (entry.value, entry.revision) if entry else None


async def stop(ctx: Context, key: str, dep: Deployment, revision: int, reason: str) -> bool:
    """Move a deployment to stopping, stop its instance, and remove the record.

    Returns:
        False if the record changed first (nothing was done; decide again later).
    """
    stopping = dep.model_copy(update={"state": AppState.STOPPING})
    rev = await ctx.state.deployments.update(key, stopping, revision)
    if rev is None:
        return False
    subject = status_subject(dep)
    await ctx.publish_status(subject, status_of(stopping, reason=reason))
    await ctx.backend.stop_viz(dep.instance)
    ctx.log.info("viz_deployment_stopped", instance=dep.instance, app=dep.app, reason=reason)
    # A page load may have replaced the record with a new instance meanwhile;
    # then that one's status is the one pages should keep seeing.
    if await ctx.state.deployments.delete(key, rev):
        stopped = stopping.model_copy(update={"state": AppState.STOPPED})
        await ctx.publish_status(subject, status_of(stopped, reason=reason))
    return True
