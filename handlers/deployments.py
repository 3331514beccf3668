"""Viz deployments: the record of an instance serving a slot, and its operations.

A deployment serves one slot of a viz app: the app's shared slot, or one
session's. Its record lives in the deployments bucket under its slot key
(`owner.title.shared`, `owner.title.session.<sid>`; see `handlers.state`).
page_load and reaper_tick share these operations; every change to a record
goes through `mutate`, a compare-and-set loop, so concurrent page loads and
reaper passes never overwrite each other's fields. Activity (later page loads,
counted heartbeats) is kept beside the record, not in it (`handlers.activity`).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
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
# A queued deployment waits behind a limit (`handlers.capacity`): it keeps its slot.
QUEUED_OR_LIVE = (AppState.QUEUED, *LIVE)


class Deployment(BaseModel):
    """A viz instance serving a slot: the shared slot, or one session's."""

    app: str
    slot: str
    instance: str
    state: AppState
    url: str | None = None
    event_id: str = Field(description="The page load that created it; its redelivery resumes it")
    created_at: float
    last_page_load: float = Field(
        description="The page load that created it; later ones are activity keys"
    )
    phases: Phases = Field(default_factory=Phases)
    error: ErrorInfo | None = None
    log_tail: str | None = None  # of a failed start: the app's last log lines
    session: str | None = None
    revision: int | None = Field(
        None, description="The app's revision it runs (`handlers.rollout`)"
    )
    draining_since: float | None = Field(
        None, description="When it was first seen running an older revision than the app's"
    )


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
    """The app's spec (read through the process's short-lived spec memory, `handlers.memo`).

    Raises:
        Rejected: no such app, or it is not a viz app.
    """
    spec = await ctx.memo.spec(name, ctx.state.apps.get)
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
        revision=dep.revision,
        **extra,
    )


def announces(dep: Deployment) -> bool:
    """Whether `dep`'s changes are published on its status subject: not those of a shared
    instance draining in a slot of its own (`handlers.rollout`); the app's subject tells
    pages about its current instance."""
    return dep.session is not None or dep.slot == SHARED


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


async def stop(
    ctx: Context,
    key: str,
    dep: Deployment,
    revision: int,
    reason: str,
    *,
    still_idle: Callable[[], Awaitable[bool]] | None = None,
) -> bool:
    """Move a deployment to stopping, stop its instance, and remove the record.

    Args:
        still_idle: asked once the record reads `stopping`, before anything is
            stopped: False calls the stop off and puts the record back. (Activity
            is not in the record, so a page load or heartbeat that came in since
            the caller decided does not make the compare-and-set fail.)

    Returns:
        False if the record changed first or the stop was called off (nothing
        was done; decide again later).
    """
    stopping = dep.model_copy(update={"state": AppState.STOPPING})
    rev = await ctx.state.deployments.update(key, stopping, revision)
    if rev is None:
        return False
    if still_idle is not None and not await still_idle():
        if await ctx.state.deployments.update(key, dep, rev) is not None:
            ctx.log.info("viz_stop_called_off", instance=dep.instance, reason=reason)
            return False
        # A page load replaced the stopping record meanwhile: the instance is no one's.
        await ctx.backend.stop_viz(dep.instance)
        ctx.log.info("viz_deployment_stopped", instance=dep.instance, app=dep.app, reason=reason)
        return True
    subject = status_subject(dep)
    announce = announces(dep)
    if announce:
        await ctx.publish_status(subject, status_of(stopping, reason=reason))
    await ctx.backend.stop_viz(dep.instance)
    ctx.log.info("viz_deployment_stopped", instance=dep.instance, app=dep.app, reason=reason)
    # A page load may have replaced the record with a new instance meanwhile;
    # then that one's status is the one pages should keep seeing.
    if await ctx.state.deployments.delete(key, rev) and announce:
        stopped = stopping.model_copy(update={"state": AppState.STOPPED})
        await ctx.publish_status(subject, status_of(stopped, reason=reason))
    return True
