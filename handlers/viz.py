"""Viz deployment operations shared by page_load, heartbeat, pool and reaper.

Every change to a deployment record goes through `mutate`, a
compare-and-set loop, so concurrent page loads, heartbeats and reaper passes
never overwrite each other's fields.
"""

import secrets
from collections.abc import Callable

from handlers.context import Context
from handlers.errors import PermanentError
from handlers.state import Deployment
from schemas import errors as codes
from schemas import subjects
from schemas.spec import AppSpec
from schemas.status import AppState, AppStatus

LIVE = (AppState.PENDING, AppState.STARTING, AppState.READY)


def new_instance_id() -> str:
    """A fresh instance id with 64 random bits: its URL is hard to guess."""
    return f"i-{secrets.token_hex(8)}"


async def load_viz_app(ctx: Context, name: str) -> AppSpec:
    """The app's spec.

    Raises:
        PermanentError: no such app, or it is not a viz app.
    """
    spec = await ctx.state.get_app(name)
    if spec is None:
        raise PermanentError(f"no app named {name!r} is registered", code=codes.UNKNOWN_APP)
    if spec.kind != "viz":
        raise PermanentError(f"{name!r} is a {spec.kind} app, not a viz app", code=codes.WRONG_KIND)
    return spec


def status_of(dep: Deployment, **extra) -> AppStatus:
    return AppStatus(
        app=dep.app,
        state=dep.state,
        url=dep.url if dep.state == AppState.READY else None,
        phases=dep.phases,
        error=dep.error,
        session=dep.session,
        instance=dep.instance,
        **extra,
    )


def status_subject(dep: Deployment) -> str:
    return subjects.app_status(dep.app, dep.session)


async def mutate(
    ctx: Context, key: str, change: Callable[[Deployment], Deployment | None]
) -> tuple[Deployment, int] | None:
    """Compare-and-set `change` on the deployment at `key` (see `State.change`).

    Returns:
        The written record and its revision, or None if absent or `change` declined.
    """
    entry = await ctx.state.change(ctx.state.deployments, key, Deployment, change)
    return (entry.value, entry.revision) if entry else None


async def stop_deployment(
    ctx: Context, key: str, dep: Deployment, revision: int, reason: str
) -> bool:
    """Move a deployment to stopping, stop its instance, and remove the record.

    Returns:
        False if the record changed first (nothing was done; decide again later).
    """
    stopping = dep.model_copy(update={"state": AppState.STOPPING})
    rev = await ctx.state.update(ctx.state.deployments, key, stopping, revision)
    if rev is None:
        return False
    subject = status_subject(dep)
    await ctx.publish_status(subject, status_of(stopping, reason=reason))
    await ctx.backend.stop_viz(dep.instance)
    ctx.log.info("viz_deployment_stopped", instance=dep.instance, app=dep.app, reason=reason)
    # A page load may have replaced the record with a new instance meanwhile;
    # then that one's status is the one pages should keep seeing.
    if await ctx.state.delete(ctx.state.deployments, key, rev):
        stopped = stopping.model_copy(update={"state": AppState.STOPPED})
        await ctx.publish_status(subject, status_of(stopped, reason=reason))
    return True
