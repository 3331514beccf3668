"""Capacity: how many viz instances may serve and start at once, held across replicas.

Three limits, each kept in one gate record (jobs bucket, compare-and-set, so
they hold across any number of page_load replicas, as run queues' do in
`handlers.runq`):

- `queue-viz.app.<owner>.<title>`: the app's `max_instances`, instances of a
  per_session app serving sessions (from the load's admission until the
  instance is stopped; warm pool members waiting to be claimed do not count);
- `queue-viz.session.<session>`: `max_instances_per_session`, the instances
  one session holds of the per_session apps that set it;
- `queue-viz.starts`: the handlers' `max_concurrent_starts`, instance starts
  in progress (a page load's cold start until ready or failed, and a pool
  refill's; a claim from a warm pool is not a start).

A page load enters its gates in that order (session, app, then starts, after
the warm pool had nothing) and holds each it got while it waits at the next.
One that finds a gate full either waits in the gate's line (its deployment
record is `queued`, its status carries `position`) or ends `failed` with
`at_capacity` at once, as its app's `at_capacity` says. The line is ordered by
when each load's deployment record was made (the handler's clock: a NATS
publisher sets its event's own `time`); a newcomer never passes a waiting
load, so a gate admits the first `limit - held` of its line. A pool refill never waits: it
starts only while a start slot is free and no page load waits for one, else
it gives its reservation back and the reaper asks for it again.

Whoever frees a place (a start that ended, an instance stopped) wakes the
first waiters with a `page_load` of their slot; that page load takes the
place (entering is idempotent per instance, so a wake-up that comes twice, or
with the viewer's own reload, admits once). Positions are published to the
first `POSITIONS_PUBLISHED` waiters whose place changed. A place held by a
deployment that is gone, a waiter whose record moved on and a wake-up lost
to a crash are made good by the reaper (`heal`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from handlers.deployments import Deployment, mutate, status_of
from handlers.errors import RetryableError
from handlers.gates import Gate, Verdict, Waiter, enter, leave, positions, wakeable
from handlers.pools import PoolIndex, is_pool_key, pool_key
from schemas import errors as codes
from schemas import subjects
from schemas.errors import ErrorInfo
from schemas.events import PageLoad
from schemas.spec import AppSpec
from schemas.status import AppState, AppStatus, Phases

if TYPE_CHECKING:
    from handlers.context import Context

POSITIONS_PUBLISHED = 100  # position updates go to the first this many waiters of a gate
WAKE_SESSION = "spinyard-wake"  # the session of a wake-up for a shared app (it has none)
_TRIES = 200  # one gate may see every page load of a crowd at once
# States in which a deployment still holds its places in the instance gates, the
# starts gate, and in which it may wait in a line.
_HOLDS_INSTANCE = (
    AppState.QUEUED,
    AppState.PENDING,
    AppState.STARTING,
    AppState.READY,
    AppState.STOPPING,
)
_HOLDS_START = (AppState.QUEUED, AppState.PENDING, AppState.STARTING)


def instance_gates(spec: AppSpec, dep: Deployment) -> list[tuple[str, int]]:
    """The gates a load of `spec` enters before it is served, in order, with their limits."""
    gates = []
    if spec.max_instances_per_session and dep.session:
        gates.append((subjects.viz_session_gate_key(dep.session), spec.max_instances_per_session))
    if spec.max_instances:
        gates.append((subjects.viz_app_gate_key(dep.app), spec.max_instances))
    return gates


def starts_gates(ctx: Context) -> list[tuple[str, int]]:
    limit = ctx.knobs.max_concurrent_starts
    return [(subjects.VIZ_STARTS_KEY, limit)] if limit > 0 else []


async def change(ctx: Context, key: str, edit: Callable[[Gate], Gate | None]) -> tuple[Gate, Gate]:
    """Compare-and-set `edit` on a gate; an emptied gate is deleted (a session's would pile up).

    Returns:
        The gate before and after (the same if `edit` declined).

    Raises:
        RetryableError: it kept changing under us for every try.
    """
    for attempt in range(_TRIES):
        entry = await ctx.state.gates.read(key)
        before = entry.value if entry else Gate()
        after = edit(before)
        empty = after is not None and not after.held and not after.waiting
        if after is None or after == before or (empty and entry is None):
            return before, before
        if entry is None:
            done = await ctx.state.gates.create(key, after) is not None
        elif empty:
            done = await ctx.state.gates.delete(key, entry.revision)
        else:
            done = await ctx.state.gates.update(key, after, entry.revision) is not None
        if done:
            return before, after
        await asyncio.sleep(random.uniform(0, 0.001 * min(attempt + 1, 20)))
    raise RetryableError(f"{key} kept changing under us", delay=0.2)


async def admit(
    ctx: Context, spec: AppSpec, key: str, dep: Deployment, subject: str, *, start: bool
) -> bool:
    """Enter `dep` into its instance gates (or, with `start`, the starts gate).

    Returns:
        True if it may go on. False if it waits (its record is `queued` and its
        page has its position) or was refused (its record is `failed`,
        `at_capacity`, and the places it got are given back).
    """
    gates = starts_gates(ctx) if start else instance_gates(spec, dep)
    now = ctx.now()
    waiter = Waiter(
        instance=dep.instance,
        key=key,
        app=dep.app,
        session=dep.session,
        at=dep.created_at,
        since=now,
        requested=dep.phases.requested,
    )
    wait = spec.at_capacity == "queue"
    for gate_key, limit in gates:
        verdict = await _enter(ctx, gate_key, limit, waiter, wait=wait)
        if verdict.admitted:
            continue
        if wait:
            await _wait(ctx, key, dep, subject, gate_key, verdict.position)
        else:
            await _refuse(ctx, key, dep, subject, gate_key, limit)
            await released(ctx, dep)  # the places it got in earlier gates, now or before
        return False
    return True


async def _wait(
    ctx: Context, key: str, dep: Deployment, subject: str, gate_key: str, position: int | None
) -> None:
    """Mark `dep` queued (if it still is this load's) and tell its page where it is.

    A place freed between its entry and this mark woke it while its record was not
    `queued` yet, and that wake-up found nothing to serve: so if a free place is for
    it now, it wakes itself.
    """

    def to_queued(d: Deployment) -> Deployment | None:
        if d.instance != dep.instance or d.state not in (AppState.PENDING, AppState.STARTING):
            return None
        return d.model_copy(update={"state": AppState.QUEUED})

    moved = await mutate(ctx, key, to_queued)
    current = moved[0] if moved else await ctx.state.deployments.get(key)
    if current is None or current.instance != dep.instance or current.state != AppState.QUEUED:
        return  # it moved on meanwhile (stopped, say): its places are given back there
    ctx.log.info("viz_load_queued", instance=dep.instance, position=position)
    await ctx.publish_status(subject, status_of(current, position=position))
    gate = await ctx.state.gates.get(gate_key)
    if gate is not None and any(w.instance == dep.instance for w in wakeable(gate)):
        await wake(ctx, gate, because=f"queued-{ctx.now():.3f}")


_FULL = {
    "app": "{app} already runs as many instances as it may ({n}, max_instances); try again later",
    "session": "this session already has as many instances open as it may ({n}, "
    "max_instances_per_session); close one and try again",
    "starts": "as many apps are starting as spinyard starts at once ({n}, "
    "max_concurrent_starts); try again in a moment",
}


async def _refuse(
    ctx: Context, key: str, dep: Deployment, subject: str, gate_key: str, limit: int
) -> None:
    """End `dep` `failed` with `at_capacity` (the app asked not to wait)."""
    kind = gate_key.split(".")[1]
    message = _FULL[kind].format(app=dep.app, n=limit)
    update = {"state": AppState.FAILED, "error": ErrorInfo(code=codes.AT_CAPACITY, message=message)}
    failed = await mutate(
        ctx, key, lambda d: d.model_copy(update=update) if d.instance == dep.instance else None
    )
    ctx.log.info("viz_load_refused", instance=dep.instance, limit=kind)
    if failed:
        await ctx.publish_status(subject, status_of(failed[0]))


async def start_refill(ctx: Context, app: str, instance: str) -> bool:
    """Take a start place for a pool refill, if one is free and no page load waits for one."""
    now = ctx.now()
    waiter = Waiter(instance=instance, key=pool_key(app), app=app, at=now, since=now)
    for gate_key, limit in starts_gates(ctx):
        if not (await _enter(ctx, gate_key, limit, waiter, wait=False)).admitted:
            return False
    return True


async def _enter(ctx: Context, key: str, limit: int, waiter: Waiter, *, wait: bool) -> Verdict:
    """`enter` the gate at `key` by compare-and-set; tell the waiters whose place moved."""
    verdicts: list[Verdict] = []

    def edit(gate: Gate) -> Gate:
        new, verdict = enter(gate, limit, waiter, waiter.since, wait=wait)
        verdicts[:] = [verdict]
        return new

    before, after = await change(ctx, key, edit)
    await publish_moves(ctx, before, after, skip=waiter.instance)
    return verdicts[0]


async def start_done(ctx: Context, instance: str) -> None:
    """A start ended (ready or not): its place goes to the first waiter."""
    await release(ctx, {instance}, [key for key, _ in starts_gates(ctx)], because=instance)


async def released(ctx: Context, dep: Deployment) -> None:
    """`dep` is stopped or failed: out of every gate it held a place in or waited at."""
    keys = [key for key, _ in starts_gates(ctx)]
    if dep.session is not None:  # only per_session apps have instance gates
        keys += [subjects.viz_app_gate_key(dep.app), subjects.viz_session_gate_key(dep.session)]
    await release(ctx, {dep.instance}, keys, because=dep.instance)


async def release(ctx: Context, instances: set[str], keys: list[str], *, because: str) -> None:
    """Take `instances` out of the gates at `keys`; wake the waiters the places are now for."""
    for key in keys:
        before, after = await change(ctx, key, lambda g: leave(g, instances))
        if after is not before:
            await publish_moves(ctx, before, after)
            await wake(ctx, after, because)


async def wake(ctx: Context, gate: Gate, because: str) -> int:
    """Send each waiter a free place is for a page load of its slot; de-duplicated by `because`."""
    woken = wakeable(gate)
    for w in woken:
        event = PageLoad(app=w.app, session=w.session or WAKE_SESSION)
        subject = subjects.event(subjects.PAGE_LOAD, w.app)
        await ctx.emit(subject, event, msg_id=f"wake-{w.instance}-{because}")
    return len(woken)


def queued_status(w: Waiter, position: int) -> AppStatus:
    """What a waiting load's page reads (built from the gate: no read of its record)."""
    return AppStatus(
        app=w.app,
        state=AppState.QUEUED,
        phases=Phases(requested=w.requested),
        session=w.session,
        instance=w.instance,
        position=position,
    )


async def publish_moves(ctx: Context, before: Gate, after: Gate, skip: str | None = None) -> None:
    """Tell the first POSITIONS_PUBLISHED waiters whose place changed where they are now."""
    if after is before:
        return
    old, new = positions(before), positions(after)
    moved = [
        w
        for w in after.waiting[:POSITIONS_PUBLISHED]
        if w.instance != skip and old.get(w.instance) != new[w.instance]
    ]
    await asyncio.gather(
        *(
            ctx.publish_status(
                subjects.app_status(w.app, w.session), queued_status(w, new[w.instance])
            )
            for w in moved
        )
    )


async def heal(
    ctx: Context, records: dict[str, Deployment], indexes: dict[str, PoolIndex], now: float
) -> int:
    """The reaper's pass over the gates, with the deployments (by slot key) and pools (by
    app) read at the start of the pass. Returns how many things it mended.

    - A place held by an instance whose deployment is gone, ended or replaced (or
      whose pool refill is no longer starting) is given back: a release lost to a
      crash, or a start that raised before it ended.
    - A waiter whose deployment is no longer queued for it leaves the line.
    - Waiters that free places are for are woken again (a wake-up lost to a crash).

    Only entries older than `reconcile_grace_s` are judged: younger ones may belong to
    deployments created after `records` was read.
    """
    grace = ctx.knobs.reconcile_grace_s
    refills = {pool_key(app): set(index.starting) for app, index in indexes.items()}
    mended = 0
    # Only the gates' keys of the jobs bucket, which mostly holds runs.
    for entry in await ctx.state.gates.scan(f"{subjects.VIZ_GATE_PREFIX}.>"):
        key, gate = entry.key, entry.value
        starts = key == subjects.VIZ_STARTS_KEY
        stale = {
            i
            for i, h in gate.held.items()
            if now - h.at > grace and not _holds(records, refills, h.key, i, starts)
        }
        stale |= {
            w.instance for w in gate.waiting if now - w.since > grace and not _waits(records, w)
        }
        if stale:
            await release(ctx, stale, [key], because=f"heal-{int(now)}")
            mended += len(stale)
        elif wakeable(gate):
            mended += await wake(ctx, gate, f"heal-{int(now)}")
    return mended


def _holds(
    records: dict[str, Deployment], refills: dict[str, set[str]], key: str, i: str, start: bool
) -> bool:
    """Whether instance `i` still holds its place: its deployment (or pool refill) is on."""
    if is_pool_key(key):
        return i in refills.get(key, set())
    dep = records.get(key)
    return (
        dep is not None
        and dep.instance == i
        and dep.state in (_HOLDS_START if start else _HOLDS_INSTANCE)
    )


def _waits(records: dict[str, Deployment], w: Waiter) -> bool:
    dep = records.get(w.key)
    return dep is not None and dep.instance == w.instance and dep.state in _HOLDS_START
