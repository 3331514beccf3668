"""Run queues: accepted at once, started under the app's, session's and backend's limits,
fairly across sessions, with positions; cancel while queued; a lost start is healed;
the limits hold with two replicas of run_request and run_start racing for one queue.

The fair order and the picks are pure functions (first tests); the rest runs
the handlers, the local backend and moto's S3 server (see test_runs).
"""

import asyncio
import time
from pathlib import Path

import pytest

from handlers import runq
from handlers.jobs import Job
from handlers.run_request import CARRIED_INPUT_BYTES
from handlers.runq import Claim, RunQueue, Waiting
from schemas import codec, subjects
from schemas.codec import encode
from schemas.events import RunCancel, RunStart
from schemas.spec import AppSpec
from schemas.status import JobPhases, JobState
from tests.handlers.replicas import handler_replica
from tests.handlers.test_runs import model_spec, running
from tests.helpers import peak, wait_for


def queue(waiting: str, claimed: str = "") -> RunQueue:
    """A queue from compact text: 'a1 a2 b1' waits (session = first letter), so does claimed."""
    return RunQueue(
        waiting=[Waiting(job_id=j, session=j[0], queued_at=0) for j in waiting.split()],
        claimed={j: Claim(session=j[0], at=0, by="ev") for j in claimed.split()},
    )


def ids(waiting: list[Waiting]) -> str:
    return " ".join(w.job_id for w in waiting)


def test_fair_order_takes_every_sessions_first_run_before_any_second():
    assert ids(runq.fair_order(queue("a1 a2 a3 b1 c1 b2"))) == "a1 b1 c1 a2 b2 a3"
    # What a session already runs counts as ahead of its waiting runs.
    assert ids(runq.fair_order(queue("a3 a4 b1", claimed="a1 a2"))) == "b1 a3 a4"
    assert runq.positions(queue("a1 a2 b1")) == {"a1": 1, "b1": 2, "a2": 3}


def test_startable_honours_the_app_and_session_limits():
    q = queue("a1 a2 a3 b1 b2 c1")
    assert ids(runq.startable(q, max_app=None, max_session=None)) == "a1 b1 c1 a2 b2 a3"
    assert ids(runq.startable(q, max_app=2, max_session=None)) == "a1 b1"
    assert ids(runq.startable(q, max_app=None, max_session=1)) == "a1 b1 c1"
    busy = queue("a2 b1", claimed="a1 c1")
    assert ids(runq.startable(busy, max_app=3, max_session=1)) == "b1"  # a is at its limit
    assert ids(runq.startable(busy, max_app=2, max_session=None)) == ""
    assert ids(runq.startable(q, max_app=None, max_session=None, most=2)) == "a1 b1"


def test_claim_and_without_move_runs_out_of_waiting():
    q = runq.claim(queue("a1 b1"), [Waiting(job_id="a1", session="a", queued_at=0)], "ev-9", 5)
    assert ids(q.waiting) == "b1" and q.claimed["a1"].by == "ev-9" and q.claimed["a1"].at == 5
    assert runq.without(q, {"zz"}) is None  # nothing to change: no write
    assert runq.without(q, {"a1", "b1"}) == RunQueue()


def limited_spec(name="demo/limited", **limits) -> AppSpec:
    return model_spec(name=name, outputs=[], **limits)


def waiting_run(tmp_path: Path, tag: str) -> dict:
    """Inputs of a run that records its start in tmp_path/runs and ends when `release` says."""
    return {
        "mode": "wait_for",
        "wait_for": str(tmp_path / f"go-{tag}"),
        "marker_dir": str(tmp_path),
    }


def release(tmp_path: Path, tag: str) -> None:
    (tmp_path / f"go-{tag}").touch()


def started(tmp_path: Path) -> list[str]:
    path = tmp_path / "runs"
    return path.read_text().split() if path.exists() else []


@pytest.fixture
async def runs(settings, s3_server):
    async with running(settings, s3_server) as r:
        yield r


async def test_runs_past_the_app_limit_wait_queued_with_positions_then_start_fairly(runs, tmp_path):
    spec = limited_spec(max_concurrent_runs=2)
    await runs.state.apps.put(spec.name, spec)
    tags = {}
    for i in range(4):
        tags[await runs.request(spec.name, waiting_run(tmp_path, f"a{i}"), session="s-a")] = i
    await wait_for(lambda: len(started(tmp_path)) == 2, what="two runs started")
    other = await runs.request(spec.name, waiting_run(tmp_path, "b"), session="s-b")
    await runs.wait_state(other, "queued")
    # Two run; the rest wait, each with its place: b's first run is ahead of a's third.
    waiting = [job for job in tags if job not in started(tmp_path)]

    def position(job):
        return [s.get("position") for s in runs.seen.get(job, [])][-1:]

    await wait_for(
        lambda: position(other) == [1] and {p for j in waiting for p in position(j)} == {2, 3},
        what=f"positions 1, 2, 3 (saw {[position(j) for j in [other, *waiting]]})",
    )
    first = started(tmp_path)[0]
    release(tmp_path, f"a{tags[first]}")
    await runs.wait_state(first, "succeeded")
    await wait_for(lambda: len(started(tmp_path)) == 3, what="the next run started")
    assert started(tmp_path)[2] == other  # fair: the other session's first run
    assert len(await runs.jobs_alive()) <= 2
    for tag in ("a1", "a2", "a3", "a0", "b"):
        release(tmp_path, tag)
    for job in [*tags, other]:
        await runs.wait_state(job, "succeeded")
    assert sorted(started(tmp_path)) == sorted([*tags, other])  # each ran once


async def test_a_session_limit_holds_one_sessions_runs_back_but_not_others(runs, tmp_path):
    spec = limited_spec(max_runs_per_session=1)
    await runs.state.apps.put(spec.name, spec)
    a0 = await runs.request(spec.name, waiting_run(tmp_path, "a0"), session="s-a")
    a1 = await runs.request(spec.name, waiting_run(tmp_path, "a1"), session="s-a")
    b0 = await runs.request(spec.name, waiting_run(tmp_path, "b0"), session="s-b")
    await wait_for(lambda: sorted(started(tmp_path)) == sorted([a0, b0]), what="a0 and b0")
    assert a1 not in started(tmp_path)
    release(tmp_path, "a0")
    await wait_for(lambda: a1 in started(tmp_path), what="a1 once a0 ended")
    for tag in ("a1", "b0"):
        release(tmp_path, tag)
    await runs.wait_state(a1, "succeeded")


async def test_a_queued_run_can_be_cancelled_and_never_starts(runs, tmp_path):
    spec = limited_spec(max_concurrent_runs=1)
    await runs.state.apps.put(spec.name, spec)
    first = await runs.request(spec.name, waiting_run(tmp_path, "1"))
    await wait_for(lambda: started(tmp_path) == [first], what="the first run")
    second = await runs.request(spec.name, waiting_run(tmp_path, "2"))
    # Accepted, then in the app's wait line behind the first (not merely accepted).
    await wait_for(
        lambda: [s.get("position") for s in runs.seen.get(second, [])][-1:] == [1],
        what="the second run waiting at position 1",
    )
    cancel = RunCancel(job_id=second)
    await runs.js.publish(
        subjects.event_for(subjects.RUN_CANCEL, second),
        encode(cancel),
        headers={"Nats-Msg-Id": cancel.id},
    )
    await runs.wait_state(second, "cancelled")
    # The status goes out first, then the run leaves the wait line (jobs.moved).
    await wait_for(
        lambda: _queue_is(runs, spec.name, waiting=[], claimed=[first]),
        what="the cancelled run out of the queue, the first still holding its slot",
    )
    release(tmp_path, "1")
    await runs.wait_state(first, "succeeded")
    await wait_for(
        lambda: _queue_empty(runs, spec.name), what="the queue empty once the first ended"
    )
    assert started(tmp_path) == [first]


async def _queue_is(runs, app, waiting: list[str], claimed: list[str]) -> bool:
    queue = await runs.state.queues.get(app)
    return [w.job_id for w in queue.waiting] == waiting and list(queue.claimed) == claimed


async def _queue_empty(runs, app) -> bool:
    queue = await runs.state.queues.get(app)
    return queue is not None and not queue.waiting and not queue.claimed


async def test_the_backends_total_slots_hold_across_apps(settings, s3_server, tmp_path):
    settings.handlers.run_slots = 1
    async with running(settings, s3_server) as runs:
        one, two = limited_spec("demo/one"), limited_spec("demo/two")
        for spec in (one, two):
            await runs.state.apps.put(spec.name, spec)
        first = await runs.request(one.name, waiting_run(tmp_path, "1"))
        await wait_for(lambda: started(tmp_path) == [first], what="the first run")
        second = await runs.request(two.name, waiting_run(tmp_path, "2"))
        await runs.wait_state(second, "queued")
        await wait_for(
            lambda: [s.get("position") for s in runs.seen[second]][-1] == 1,
            what="the other app's run waiting at position 1",
        )
        assert started(tmp_path) == [first]
        release(tmp_path, "1")
        await wait_for(lambda: second in started(tmp_path), what="the slot passed on")
        release(tmp_path, "2")
        await runs.wait_state(second, "succeeded")

        # The slot is given back just after the `succeeded` status is published.
        async def slot_free():
            slots = await runs.state.slots.get("total")
            return slots is not None and slots.held == {}

        await wait_for(slot_free, what="the run slot given back")


async def test_a_full_queue_refuses_the_run_too_many(runs, tmp_path):
    spec = limited_spec(max_concurrent_runs=1, max_queued_runs=1)
    await runs.state.apps.put(spec.name, spec)
    first = await runs.request(spec.name, waiting_run(tmp_path, "1"))
    await wait_for(lambda: started(tmp_path) == [first], what="the first run")
    second = await runs.request(spec.name, waiting_run(tmp_path, "2"))
    await runs.wait_state(second, "queued")
    third = await runs.request(spec.name, waiting_run(tmp_path, "3"))
    failed = await runs.wait_state(third, "failed")
    assert failed["error"]["code"] == "too_many"
    assert "max_queued_runs" in failed["error"]["message"]
    for tag in ("1", "2"):
        release(tmp_path, tag)
    await runs.wait_state(second, "succeeded")


async def test_acceptance_does_not_wait_for_the_start(settings, s3_server, tmp_path):
    """Without a run_start handler, a request still gets `queued`, and nothing starts."""
    async with running(settings, s3_server, ["run_request"]) as runs:
        assert runs.state.pools.latest is None  # it takes no pool members: no pool watch
        job = await runs.request(inputs=waiting_run(tmp_path, "x"))
        await runs.wait_state(job, "queued")
        # Its start waits on the events stream for a run_start handler.
        msg = await runs.js.get_last_msg(
            subjects.EVENTS_STREAM, subjects.event(subjects.RUN_START, "demo/model")
        )
        start = codec.decode(RunStart, msg.data)
        assert start.job_id == job
        assert started(tmp_path) == [] and await runs.jobs_alive() == []
        # It carries the run's record as written, so run_start need not read it...
        entry = await runs.state.jobs.read(job)
        assert start.record == entry.value.model_dump(mode="json")
        assert start.record_revision == entry.revision
        # ...unless its inputs are large: then run_start reads it.
        big = await runs.request(inputs={"pad": "x" * (CARRIED_INPUT_BYTES + 1)})
        await runs.wait_state(big, "queued")
        msg = await runs.js.get_last_msg(
            subjects.EVENTS_STREAM, subjects.event(subjects.RUN_START, "demo/model")
        )
        start = codec.decode(RunStart, msg.data)
        assert start.job_id == big and start.record is None and start.record_revision is None


@pytest.mark.parametrize("limit", [None, 3], ids=["no limit", "a limit"])
async def test_a_start_carrying_a_record_that_changed_since_goes_by_the_record_in_kv(
    runs, tmp_path, limit
):
    """The record a start event carries may be out of date (the run was cancelled after its
    request): the run never starts, and a limited app's queue does not take it in."""
    spec = limited_spec("demo/free", max_concurrent_runs=limit)
    await runs.state.apps.put(spec.name, spec)
    job = await queued_5s_ago(runs, "j-0000000000000000000000cc", spec.name, tmp_path, "z")
    queued = await runs.state.jobs.read(job.job_id)
    cancel = RunCancel(job_id=job.job_id)
    await runs.js.publish(
        subjects.event_for(subjects.RUN_CANCEL, job.job_id),
        encode(cancel),
        headers={"Nats-Msg-Id": cancel.id},
    )
    await runs.wait_state(job.job_id, "cancelled")
    start = RunStart(
        app=spec.name,
        job_id=job.job_id,
        record=queued.value.model_dump(mode="json"),
        record_revision=queued.revision,
    )
    subject = subjects.event(subjects.RUN_START, spec.name)
    ack = await runs.js.publish(subject, encode(start))
    other = await runs.request(spec.name, waiting_run(tmp_path, "o"))  # starts after it
    await wait_for(lambda: started(tmp_path) == [other], what="the other run started")

    async def handled() -> bool:
        info = await runs.js.consumer_info(subjects.EVENTS_STREAM, subjects.RUN_START)
        return info.ack_floor.stream_seq >= ack.seq

    await wait_for(handled, what="the stale start handled")
    assert (await runs.state.jobs.get(job.job_id)).state == JobState.CANCELLED
    queue = await runs.state.queues.get(spec.name)
    held = {*queue.claimed, *(w.job_id for w in queue.waiting)} if queue else set()
    assert job.job_id not in held  # not taken in (no place held until the reaper's pass)
    assert [i.id for i in await runs.jobs_alive()] == [other]
    release(tmp_path, "o")
    await runs.wait_state(other, "succeeded")
    if limit is not None:
        await wait_for(lambda: _queue_empty(runs, spec.name), what="the queue emptied")


async def queued_5s_ago(runs, job_id: str, app: str, tmp_path: Path, tag: str) -> Job:
    """The record of a run accepted 5 s ago whose start never came (its run_request wrote
    it, nothing else did)."""
    now = time.time()
    job = Job(
        job_id=job_id,
        app=app,
        session="s-1",
        state=JobState.QUEUED,
        event_id="ev-lost-request",
        inputs=waiting_run(tmp_path, tag),
        deadline_s=30,
        retention_s=60,
        created_at=now - 5,
        phases=JobPhases(queued=now - 5),
    )
    await runs.state.jobs.create(job.job_id, job)
    return job


async def test_a_claim_whose_start_was_lost_is_started_by_the_reaper(settings, s3_server, tmp_path):
    """A run_start handler claimed a run and died, and its event is gone (dead-lettered,
    say): the run is claimed in its queue but never reached the backend. The reaper's
    pass claims it again with a fresh run_start, and it runs, once."""
    settings.reaper.reconcile_grace_s = 0.5
    settings.reaper.interval_s = 0.5
    async with running(settings, s3_server) as runs:
        spec = limited_spec(max_concurrent_runs=4)
        await runs.state.apps.put(spec.name, spec)
        now = time.time()
        job = await queued_5s_ago(runs, "j-0000000000000000000000aa", spec.name, tmp_path, "x")
        lost = RunQueue(claimed={job.job_id: Claim(session="s-1", at=now - 5, by="ev-lost")})
        await runs.state.queues.put(spec.name, lost)
        await wait_for(lambda: started(tmp_path) == [job.job_id], what="the lost start made")
        release(tmp_path, "x")
        await runs.wait_state(job.job_id, "succeeded")
        assert started(tmp_path) == [job.job_id]
        await wait_for(lambda: _queue_empty(runs, spec.name), what="the queue emptied")


async def test_runs_of_an_app_without_limits_start_with_no_queue_record(runs, tmp_path):
    """Nothing can make such a run wait, so its start and its end change no queue record
    (they cost no round trip there); one of a limited app goes through its queue."""
    free = limited_spec("demo/free")
    await runs.state.apps.put(free.name, free)
    jobs = [await runs.request(free.name, waiting_run(tmp_path, f"f{i}")) for i in range(3)]
    await wait_for(lambda: sorted(started(tmp_path)) == sorted(jobs), what="all three started")
    for i, job in enumerate(jobs):
        release(tmp_path, f"f{i}")
        await runs.wait_state(job, "succeeded")
        assert (await runs.state.jobs.get(job)).in_queue is False
    assert await runs.state.queues.read(free.name) is None  # never made
    limited = limited_spec(max_concurrent_runs=3)
    await runs.state.apps.put(limited.name, limited)
    job = await runs.request(limited.name, waiting_run(tmp_path, "l"))
    await wait_for(lambda: job in started(tmp_path), what="the limited app's run started")
    assert job in (await runs.state.queues.get(limited.name)).claimed
    release(tmp_path, "l")
    await runs.wait_state(job, "succeeded")
    await wait_for(lambda: _queue_empty(runs, limited.name), what="its place freed")


async def test_a_queued_run_whose_start_was_lost_is_started_by_the_reaper(
    settings, s3_server, tmp_path
):
    """A run recorded `queued` whose run_start never did its work (its last delivery died
    with its handler, say) is in no queue and not started: the reaper's pass asks for its
    start again, and it runs, once."""
    settings.reaper.reconcile_grace_s = 0.5
    settings.reaper.interval_s = 0.5
    async with running(settings, s3_server) as runs:
        spec = limited_spec("demo/free")
        await runs.state.apps.put(spec.name, spec)
        job = await queued_5s_ago(runs, "j-0000000000000000000000bb", spec.name, tmp_path, "y")
        await wait_for(lambda: started(tmp_path) == [job.job_id], what="the lost start made")
        release(tmp_path, "y")
        await runs.wait_state(job.job_id, "succeeded")
        assert started(tmp_path) == [job.job_id]


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most of the [start, end] spans that overlap at any time."""
    edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    most = now = 0
    for _, step in edges:  # at equal times an end (-1) sorts before a start
        now += step
        most = max(most, now)
    return most


async def test_limits_hold_with_two_replicas_starting_runs_at_once(settings, s3_server, tmp_path):
    """Runs requested at once through two replicas of run_request and run_start: the
    app's and each session's limits hold (kept in KV, changed by compare-and-set, so a
    replica's claim that raced another's is made again), and every run runs once. The
    reaper's healing of lost starts is held off: a queue write lost in a race would
    leave a run waiting for good."""
    settings.reaper.reconcile_grace_s = 3600
    async with (
        running(settings, s3_server) as runs,
        handler_replica(
            settings,
            ["run_request", "run_start"],
            "replica-b",
            backend=runs.backend,
            store=runs.store,
        ),
    ):
        spec = limited_spec(max_concurrent_runs=3, max_runs_per_session=1)
        await runs.state.apps.put(spec.name, spec)
        sessions = [f"s-{i}" for i in range(6)]
        inputs = {"mode": "sleep", "seconds": 0.3, "marker_dir": str(tmp_path)}

        async def alive_jobs() -> int:
            return len(await runs.jobs_alive())

        async with peak(alive_jobs) as alive:
            jobs = []
            for _ in range(4):  # in waves, so the line empties and claims race on short ones
                wave = (runs.request(spec.name, inputs, session=s) for s in sessions)
                jobs += await asyncio.gather(*wave)
                await asyncio.sleep(0.2)
            done = [await runs.wait_state(job, "succeeded", timeout=60) for job in jobs]
        assert sorted(started(tmp_path)) == sorted(jobs)  # each ran, once
        queued = [s for job in jobs for s in runs.seen[job] if s["state"] == "queued"]
        assert max(s.get("position") or 0 for s in queued) >= 10  # a line formed
        # A run holds its place from its start to its end (its place is given back
        # only once its end is written), so no more spans than the limit overlap.
        spans = [(s["phases"]["running"], s["phases"]["finished"]) for s in done]
        assert most_at_once(spans) == 3
        assert alive.most <= 3
        for session in sessions:
            own = [sp for sp, s in zip(spans, done, strict=True) if s["session"] == session]
            assert most_at_once(own) == 1, f"{session} ran more than one at a time"
        await wait_for(lambda: _queue_empty(runs, spec.name), what="the queue emptied")
