"""Run queues: which accepted run starts next, under the app's, sessions' and backend's limits.

run_request only records a run (`queued`) and publishes a `run_start` for it;
run_start puts it in its app's queue and starts every waiting run that fits:
at most `max_concurrent_runs` of the app and `max_runs_per_session` of one
session running, and, when `handlers.run_slots` is set, that many of all apps
together. A run that ends leaves its queue and nudges it (a `run_start`
without a job id), so the next one starts.

Records (jobs bucket, compare-and-set, so the limits hold across replicas):

- `queue.<owner>.<title>` -> `RunQueue`: the app's waiting runs in arrival
  order, and its claimed ones (their start was handed out; they count against
  the limits until they end);
- `queue-slots` -> `Slots`: the runs holding one of the backend's
  `run_slots`, and the apps that found none free (nudged when one frees).

Fair order: a waiting run's rank is the number of its session's runs ahead of
it (claimed, or waiting before it); runs start by rank, then by arrival. The
first waiting run of every session comes before any session's second, so a
session that queues a hundred runs delays another session's one by at most
one start. `position` in a queued run's status is its place in that order.

Crashes: a claim names the event that made it, and only that event's handler
starts the run, so two replicas never both start one; a redelivery of that
event starts its claims again (backends treat a repeated start of one job id
as a no-op). A claim whose start never came, a nudge that was lost and a slot
held by a run that is gone are all made good by the reaper (`heal`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from schemas import subjects
from schemas.events import RunStart
from schemas.spec import AppSpec
from schemas.status import JobPhases, JobState, JobStatus

if TYPE_CHECKING:
    from handlers.context import Context

POSITIONS_PUBLISHED = 100  # position updates go to the first this many waiting runs


class Waiting(BaseModel):
    job_id: str
    session: str | None = None
    queued_at: float


class Claim(BaseModel):
    session: str | None = None
    at: float = Field(description="When the start was claimed")
    by: str = Field(description="The run_start event that claimed it, and starts it")


class RunQueue(BaseModel):
    """One job app's queue: waiting runs in arrival order, claimed runs by job id."""

    waiting: list[Waiting] = Field(default_factory=list)
    claimed: dict[str, Claim] = Field(default_factory=dict)


class Hold(BaseModel):
    app: str
    at: float


class Slots(BaseModel):
    """The backend's total run slots: who holds one, which apps wait for one."""

    held: dict[str, Hold] = Field(default_factory=dict)
    blocked: list[str] = Field(default_factory=list)


def limited(spec: AppSpec, run_slots: int) -> bool:
    """Whether a run of the app may have to wait: only then does its start go through the
    queue. Runs of an app with no limit (nor a total) start at once, with no queue record
    to change on their start or end: a limit set later counts the runs started after it."""
    return (
        spec.max_concurrent_runs is not None
        or spec.max_runs_per_session is not None
        or run_slots > 0
    )


def fair_order(queue: RunQueue) -> list[Waiting]:
    """The waiting runs in the order they would start (see the module's docstring)."""
    ahead = Counter(c.session for c in queue.claimed.values())
    ranked = []
    for i, w in enumerate(queue.waiting):
        ranked.append((ahead[w.session], i, w))
        ahead[w.session] += 1
    return [w for _, _, w in sorted(ranked, key=lambda r: (r[0], r[1]))]


def positions(queue: RunQueue) -> dict[str, int]:
    """Job id -> place in the fair order (1: the next to start)."""
    return {w.job_id: i for i, w in enumerate(fair_order(queue), start=1)}


def startable(
    queue: RunQueue, max_app: int | None, max_session: int | None, most: int | None = None
) -> list[Waiting]:
    """The waiting runs that may start now, in fair order: at most `most` of them."""
    running = len(queue.claimed)
    per_session = Counter(c.session for c in queue.claimed.values())
    chosen: list[Waiting] = []
    for w in fair_order(queue):
        if (max_app is not None and running >= max_app) or (
            most is not None and len(chosen) >= most
        ):
            break
        if max_session is not None and per_session[w.session] >= max_session:
            continue
        chosen.append(w)
        running += 1
        per_session[w.session] += 1
    return chosen


def claim(queue: RunQueue, chosen: list[Waiting], by: str, now: float) -> RunQueue:
    """`queue` with `chosen` moved from waiting to claimed by event `by`."""
    ids = {w.job_id for w in chosen}
    claimed = dict(queue.claimed)
    for w in chosen:
        claimed[w.job_id] = Claim(session=w.session, at=now, by=by)
    return RunQueue(waiting=[w for w in queue.waiting if w.job_id not in ids], claimed=claimed)


def without(queue: RunQueue, job_ids: set[str]) -> RunQueue | None:
    """`queue` without those runs, or None if it holds none of them."""
    if not any(j in queue.claimed for j in job_ids) and not any(
        w.job_id in job_ids for w in queue.waiting
    ):
        return None
    return RunQueue(
        waiting=[w for w in queue.waiting if w.job_id not in job_ids],
        claimed={j: c for j, c in queue.claimed.items() if j not in job_ids},
    )


def queued_status(app: str, w: Waiting, position: int | None) -> JobStatus:
    """What a waiting run's page reads (built from the queue: no read of its record)."""
    return JobStatus(
        job_id=w.job_id,
        app=app,
        state=JobState.QUEUED,
        phases=JobPhases(queued=w.queued_at),
        session=w.session,
        position=position,
    )


async def publish_moves(ctx: Context, app: str, before: RunQueue, after: RunQueue) -> None:
    """Tell the first POSITIONS_PUBLISHED waiting runs whose place changed where they are."""
    old = positions(before)
    moved = [
        (w, i)
        for i, w in enumerate(fair_order(after)[:POSITIONS_PUBLISHED], start=1)
        if old.get(w.job_id) != i
    ]
    await asyncio.gather(
        *(
            ctx.publish_status(subjects.job_status(w.job_id), queued_status(app, w, i))
            for w, i in moved
        )
    )


async def nudge(ctx: Context, app: str, because: str) -> None:
    """Ask run_start to start whatever fits in `app`'s queue; de-duplicated by `because`."""
    event = RunStart(app=app)
    await ctx.emit(subjects.event(subjects.RUN_START, app), event, msg_id=f"nudge-{because}")


async def take_slots(ctx: Context, app: str, job_ids: list[str]) -> list[str]:
    """Hold one of the backend's total slots for as many of `job_ids` as are free, in order.

    Returns the ones that got a slot. If some got none, `app` is noted as blocked and is
    nudged when a slot frees.
    """
    if ctx.knobs.run_slots <= 0 or not job_ids:
        return job_ids
    now = ctx.now()
    got: list[str] = []

    def take(slots: Slots) -> Slots | None:
        got.clear()
        free = ctx.knobs.run_slots - len(slots.held)
        got.extend(job_ids[: max(free, 0)])
        held = dict(slots.held) | {j: Hold(app=app, at=now) for j in got}
        blocked = list(slots.blocked)
        if len(got) < len(job_ids) and app not in blocked:
            blocked.append(app)
        if not got and blocked == slots.blocked:
            return None
        return Slots(held=held, blocked=blocked)

    await ctx.state.slots.change("total", take, default=Slots)
    return list(got)


async def free_slots(ctx: Context, job_ids: set[str]) -> None:
    """Give back the total slots `job_ids` hold; nudge the apps that waited for one."""
    if ctx.knobs.run_slots <= 0 or not job_ids:
        return
    blocked: list[str] = []

    def give(slots: Slots) -> Slots | None:
        blocked.clear()
        if not job_ids & slots.held.keys():
            return None
        blocked.extend(slots.blocked)
        held = {j: h for j, h in slots.held.items() if j not in job_ids}
        return Slots(held=held, blocked=[])

    entry = await ctx.state.slots.change("total", give)
    if entry is not None:
        tag = "-".join(sorted(job_ids))[:200]
        for app in blocked:
            await nudge(ctx, app, f"slot-{tag}-{app}")


async def release(ctx: Context, app: str, job_id: str) -> None:
    """The run has ended: out of its queue and its slot, and the queue nudged if runs wait."""
    entry = await ctx.state.queues.change(app, lambda q: without(q, {job_id}))
    await free_slots(ctx, {job_id})
    if entry is not None and entry.value.waiting:
        await nudge(ctx, app, f"end-{job_id}")


async def heal(ctx: Context, runs: dict, now: float) -> int:
    """The reaper's pass over the run queues; `runs` maps job ids to their records, as read
    at the start of the pass. Returns how many things it mended.

    - Runs gone or ended leave their queue and their slot (a release lost to a crash).
    - A claim whose start never reached the backend (the claimer crashed and its event
      was not redelivered) is claimed again by a new `run_start`, which starts it.
    - A queue with runs waiting is nudged (a nudge lost to a crash).
    - A run still queued that no start took up (in no queue, not started: its
      `run_start` was lost, say its last delivery died with its handler) is asked to
      start again.

    Only entries older than `reconcile_grace_s` are judged: younger ones may belong to
    runs created after `runs` was read.
    """
    grace = ctx.knobs.reconcile_grace_s
    mended = 0

    def over(job_id: str, since: float) -> bool:
        job = runs.get(job_id)
        return now - since > grace and (job is None or job.state.terminal)

    held: set[str] = set()  # the runs some queue holds
    for entry in await ctx.state.queues.scan("queue.>"):  # the queues, not the runs
        app, queue = entry.key, entry.value
        held |= {w.job_id for w in queue.waiting} | queue.claimed.keys()
        gone = {w.job_id for w in queue.waiting if over(w.job_id, w.queued_at)}
        gone |= {j for j, c in queue.claimed.items() if over(j, c.at)}
        if gone:
            await ctx.state.queues.change(app, lambda q, gone=gone: without(q, gone))
            await free_slots(ctx, gone)
            mended += len(gone)
        for job_id, c in queue.claimed.items():
            job = runs.get(job_id)
            lost = job is not None and job.state == JobState.QUEUED and job.phases.started is None
            if lost and now - c.at > grace:
                await _claim_again(ctx, app, job_id, c.by)
                mended += 1
        if queue.waiting:
            await nudge(ctx, app, f"heal-{app}-{int(now)}")
    for job_id, job in runs.items():
        if (
            job.state == JobState.QUEUED
            and job.phases.started is None
            and job_id not in held
            and now - job.created_at > grace
        ):
            event = RunStart(app=job.app, job_id=job_id)
            subject = subjects.event(subjects.RUN_START, job.app)
            await ctx.emit(subject, event, msg_id=f"heal-start-{job_id}")
            ctx.log.warning("job_start_asked_again", job_id=job_id, app=job.app)
            mended += 1
    slots = await ctx.state.slots.get("total")
    if slots is not None:
        stale = {j for j, h in slots.held.items() if over(j, h.at)}
        if stale:
            await free_slots(ctx, stale)
            mended += len(stale)
    return mended


async def _claim_again(ctx: Context, app: str, job_id: str, by: str) -> None:
    """Move a lost claim to a new `run_start` event, and publish that event."""
    event = RunStart(app=app, job_id=job_id)

    def move(queue: RunQueue) -> RunQueue | None:
        claim = queue.claimed.get(job_id)
        if claim is None or claim.by != by:
            return None  # started or moved since
        claimed = dict(queue.claimed)
        claimed[job_id] = claim.model_copy(update={"by": event.id, "at": ctx.now()})
        return RunQueue(waiting=queue.waiting, claimed=claimed)

    if await ctx.state.queues.change(app, move) is not None:
        await ctx.emit(subjects.event(subjects.RUN_START, app), event)
        ctx.log.warning("job_start_claimed_again", job_id=job_id, app=app)
