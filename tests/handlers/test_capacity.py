"""Instance limits through the handlers: real nats-server, real app processes, two replicas.

A crowd of page loads on a per_session app with `max_instances`, under the
handlers' `max_concurrent_starts`, across two page_load replicas: never more
instances or starts than the limits, queued loads told their position and
served in turn as viewers leave. Then `at_capacity: fail`,
`max_instances_per_session` across apps, starts of shared apps, pool refills
under the starts limit, and the reaper giving back a place whose holder is gone.
"""

import asyncio
import contextlib
import time

import pytest
import structlog

from dispatcher import bus
from dispatcher.backends.local.backend import LocalBackend
from handlers import capacity
from handlers.context import Context
from handlers.deployments import session_slot, slot_key
from handlers.gates import Gate, Hold
from handlers.runq import RunQueue
from schemas import subjects
from schemas.spec import IdleLimits, Pool
from tests.handlers.replicas import handler_replica
from tests.handlers.test_viz_lifecycle import Stack, Statuses, hello_spec, running_stack
from tests.helpers import peak, wait_for

CLASS = "demo/class"
REPLICA_B = ["page_load", "pool_refill"]  # the other replica: all handlers


class CountingBackend(LocalBackend):
    """The local backend, counting the starts in progress and the most seen at once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.starting: set[str] = set()
        self.most_starting = 0

    async def start_viz(self, instance_id, spec, *, pooled=False):
        self.starting.add(instance_id)
        self.most_starting = max(self.most_starting, len(self.starting))
        await super().start_viz(instance_id, spec, pooled=pooled)

    async def wait_ready(self, instance_id, spec, timeout):
        try:
            await super().wait_ready(instance_id, spec, timeout)
        finally:
            self.starting.discard(instance_id)


@contextlib.asynccontextmanager
async def two_replicas(settings):
    """Two handler services on their own NATS connections over one backend (a cluster is
    shared by every replica): A runs every handler, B page_load and pool_refill."""
    backend = CountingBackend(settings.backend.local, settings.data_dir, "http://127.0.0.1:9999")
    await backend.setup()
    watcher = await bus.connect(settings.nats, "test")
    statuses = Statuses()
    await watcher.subscribe(f"{subjects.STATUS}.>", cb=statuses.on_msg)
    try:
        async with (
            handler_replica(settings, None, "replica-a", backend=backend) as a,
            handler_replica(settings, REPLICA_B, "replica-b", backend=backend),
        ):
            stack = Stack(settings, watcher, backend, statuses)
            stack.state = await bus.ensure_state(watcher.jetstream(), settings.nats)
            stack.service = a
            yield stack
    finally:
        for instance in await backend.list_instances():
            await backend.stop_viz(instance.id)
        await backend.cleanup()
        await watcher.close()


@pytest.fixture
async def stack(settings):
    async with running_stack(settings) as s:
        yield s


def class_spec(**limits):
    """A per_session app whose instances are reaped 1 s after their viewer's last heartbeat."""
    idle = IdleLimits(
        since_heartbeat_s=1.0, since_page_load_s=3600, max_lifetime_s=3600, input_window_s=60
    )
    return hello_spec(name=CLASS, sharing="per_session", idle=idle, start_timeout_s=30, **limits)


def session_states(stack, app, session) -> list[dict]:
    return stack.statuses.by_subject.get(subjects.app_status(app, session), [])


async def viewers_until_ready(stack, app, sessions, served: dict[str, str]):
    """Each session heartbeats while it waits (as embed.js does), and leaves once ready."""
    while len(served) < len(sessions):
        for s in sessions:
            last = (session_states(stack, app, s) or [{}])[-1]
            if last.get("state") == "ready" and s not in served:
                served[s] = last["instance"]
            elif s not in served:
                await stack.heartbeat(app, session=s)
        await asyncio.sleep(0.2)


async def test_limits_hold_under_fifty_concurrent_page_loads_across_two_replicas(settings):
    settings.handlers.max_concurrent_starts = 3
    async with two_replicas(settings) as stack:
        slow = ["sh", "-c", 'sleep 0.5; exec "$0" app.py', "{python}"]  # starts overlap
        await stack.register(class_spec(max_instances=5, command=slow))
        sessions = [f"s-{i:02d}" for i in range(50)]
        served: dict[str, str] = {}

        async def alive_instances() -> int:
            return len(await stack.viz_instances())

        async with peak(alive_instances) as alive:
            await asyncio.gather(*(stack.page_load(CLASS, session=s) for s in sessions))
            # (ten rounds of five starts and idle reaps: about 30 s on a quiet machine)
            await asyncio.wait_for(viewers_until_ready(stack, CLASS, sessions, served), 180)
        assert alive.most == 5  # the limit, reached and never passed
        assert stack.backend.most_starting == 3
        assert len(set(served.values())) == 50  # each session its own instance, once
        queued = {
            s: [st["position"] for st in session_states(stack, CLASS, s) if st["state"] == "queued"]
            for s in sessions
        }
        waited = [s for s in sessions if queued[s]]
        assert len(waited) >= 45, f"only {len(waited)} loads were told they wait"
        # Places in a line of at most 45 (50 less the 5 served), the crowd's last far back.
        assert all(1 <= p <= 45 for s in waited for p in queued[s])
        assert max(queued[s][0] for s in waited) >= 25
        # Positions move as the line does: some load saw itself come forward.
        assert any(len(set(queued[s])) > 3 and queued[s][-1] < queued[s][0] for s in waited)
        # Once all left, every place is back: the gates are gone.
        await wait_for(lambda: _no_gates(stack), timeout=20, what="gates emptied")


async def _no_gates(stack) -> bool:
    return await stack.state.gates.scan() == []


async def test_an_app_that_will_not_queue_fails_at_capacity_at_once(stack):
    await stack.register(class_spec(max_instances=1, at_capacity="fail"))
    await stack.page_load(CLASS, session="first")
    await stack.wait_state(subjects.app_status(CLASS, "first"), "ready")
    await stack.page_load(CLASS, session="second")
    failed = await stack.wait_state(subjects.app_status(CLASS, "second"), "failed")
    assert failed["error"] == {
        "code": "at_capacity",
        "message": f"{CLASS} already runs as many instances as it may (1, max_instances); "
        "try again later",
    }
    assert "queued" not in [s["state"] for s in session_states(stack, CLASS, "second")]
    assert len(await stack.viz_instances()) == 1
    gate = await stack.state.gates.get(subjects.viz_app_gate_key(CLASS))
    assert list(gate.held) == [session_states(stack, CLASS, "first")[-1]["instance"]]
    assert gate.waiting == []


async def test_a_session_holds_at_most_its_share_across_the_apps_that_limit_it(stack):
    one, two, free = (
        class_spec(max_instances_per_session=1).model_copy(update={"name": name})
        for name in ("demo/one", "demo/two", "demo/free")
    )
    free = free.model_copy(update={"max_instances_per_session": None})
    for spec in (one, two, free):
        await stack.register(spec)
    await stack.page_load("demo/one", session="kim")
    await stack.wait_state(subjects.app_status("demo/one", "kim"), "ready")
    await stack.page_load("demo/free", session="kim")  # not limited, not counted
    await stack.wait_state(subjects.app_status("demo/free", "kim"), "ready")
    await stack.page_load("demo/two", session="kim")
    queued = await stack.wait_state(subjects.app_status("demo/two", "kim"), "queued")
    assert queued["position"] == 1
    await stack.page_load("demo/two", session="lee")  # another session is not held back
    await stack.wait_state(subjects.app_status("demo/two", "lee"), "ready")
    # Kim leaves demo/one (no heartbeats: reaped after 1 s) and is served demo/two.
    served: dict[str, str] = {}
    await asyncio.wait_for(viewers_until_ready(stack, "demo/two", ["kim"], served), 20)
    stopped = session_states(stack, "demo/one", "kim")[-1]
    assert stopped["state"] == "stopped"
    assert stopped["time"] < session_states(stack, "demo/two", "kim")[-1]["time"]


async def test_starts_past_the_limit_wait_and_go_as_starts_finish(settings):
    settings.handlers.max_concurrent_starts = 1
    async with running_stack(settings, backend_cls=CountingBackend) as stack:
        slow = ["sh", "-c", 'sleep 0.5; exec "$0" app.py', "{python}"]
        names = [f"demo/shared{i}" for i in range(3)]
        for name in names:
            await stack.register(hello_spec(name=name, command=slow))
        for name in names:
            await stack.page_load(name)
        for name in names:
            await stack.wait_state(subjects.app_status(name), "ready")
        assert stack.backend.most_starting == 1
        positions = [
            s.get("position")
            for name in names
            for s in stack.statuses.by_subject[subjects.app_status(name)]
            if s["state"] == "queued"
        ]
        assert positions and set(positions) <= {1, 2}


async def test_pool_refills_wait_for_a_free_start(settings):
    settings.handlers.max_concurrent_starts = 1
    settings.reaper.pool_refill_per_tick = 3  # three asked for at once: one starts at a time
    async with running_stack(settings, backend_cls=CountingBackend) as stack:
        await stack.register(hello_spec(name="demo/pooled", pool=Pool(size=3)))

        async def warm():
            index = await stack.state.pools.get("demo/pooled")
            return len(index.warm) if index else 0

        await wait_for(lambda: _at_least(warm, 3), timeout=30, what="the pool filled")
        assert stack.backend.most_starting == 1


async def _at_least(fn, n) -> bool:
    return await fn() >= n


async def test_the_reaper_gives_back_a_place_whose_holder_is_gone(stack):
    await stack.register(class_spec(max_instances=1))
    # A place held by an instance no deployment has (its handler died before the record),
    # too young yet for the reaper to judge (reconcile_grace_s), so kim queues behind it.
    key, gone_instance = subjects.viz_app_gate_key(CLASS), "i-0000000000000000"
    gone = Gate(limit=1, held={gone_instance: Hold(key="x", at=time.time())})
    await stack.state.gates.put(key, gone)
    await stack.page_load(CLASS, session="kim")
    subject = subjects.app_status(CLASS, "kim")
    await wait_for(lambda: "queued" in stack.statuses.states(subject), what="kim queued")
    queued = next(s for s in stack.statuses.by_subject[subject] if s["state"] == "queued")
    assert queued["position"] == 1

    def aged(gate: Gate) -> Gate:  # a minute on: old enough to judge, its holder still gone
        held = gate.held | {gone_instance: Hold(key="x", at=time.time() - 60)}
        return gate.model_copy(update={"held": held})

    await stack.state.gates.change(key, aged)
    await stack.wait_state(subject, "ready")
    record = await stack.state.deployments.get(slot_key(CLASS, session_slot("kim")))
    gate = await stack.state.gates.get(subjects.viz_app_gate_key(CLASS))
    assert list(gate.held) == [record.instance]


@pytest.mark.parametrize("mode", ["queue", "fail"])
async def test_a_queued_load_leaves_the_line_when_its_viewer_goes(stack, mode):
    """The first viewer stays; nobody heartbeats for the second, queued load: it is reaped
    like an idle instance (queue), or was never in the line (fail)."""
    await stack.register(class_spec(max_instances=1, at_capacity=mode))
    await stack.page_load(CLASS, session="first")
    first = await stack.wait_state(subjects.app_status(CLASS, "first"), "ready")

    async def first_stays():
        while True:
            await stack.heartbeat(CLASS, session="first")
            await asyncio.sleep(0.2)

    stays = asyncio.create_task(first_stays(), name="first-viewer")
    try:
        await stack.page_load(CLASS, session="second")
        end = "stopped" if mode == "queue" else "failed"
        second = await stack.wait_state(subjects.app_status(CLASS, "second"), end)
    finally:
        stays.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stays
    states = [s["state"] for s in session_states(stack, CLASS, "second")]
    assert states == (["queued", "stopping", "stopped"] if mode == "queue" else ["failed"])
    if mode == "queue":
        assert second["reason"] == "idle_heartbeat"
    else:
        assert second["error"]["code"] == "at_capacity"
    assert [i.id for i in await stack.viz_instances()] == [first["instance"]]

    async def out_of_the_line():  # the reaper leaves the gates just after `stopped`
        gate = await stack.state.gates.get(subjects.viz_app_gate_key(CLASS))
        return list(gate.held) == [first["instance"]] and gate.waiting == []

    await wait_for(out_of_the_line, timeout=5, what="the second load out of the app's gate")


async def test_a_lost_wake_up_is_sent_again_by_the_reaper(stack):
    await stack.register(class_spec(max_instances=1))

    async def viewers_stay():
        while True:
            for session in ("first", "second"):
                await stack.heartbeat(CLASS, session=session)
            await asyncio.sleep(0.2)

    stay = asyncio.create_task(viewers_stay(), name="viewers")
    try:
        await stack.page_load(CLASS, session="first")
        await stack.wait_state(subjects.app_status(CLASS, "first"), "ready")
        await stack.page_load(CLASS, session="second")
        subject = subjects.app_status(CLASS, "second")
        await stack.wait_state(subject, "queued")
        # The place is given back, but the releaser died before it woke the second.
        key = subjects.viz_app_gate_key(CLASS)
        entry = await stack.state.gates.read(key)
        freed = entry.value.model_copy(update={"held": {}})
        assert await stack.state.gates.update(key, freed, entry.revision) is not None
        ready = await stack.wait_state(subject, "ready")
    finally:
        stay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stay
    gate = await stack.state.gates.get(key)
    assert list(gate.held) == [ready["instance"]] and gate.waiting == []


async def test_a_pass_over_no_gates_is_quick_when_the_jobs_bucket_has_runs(stack):
    """The reaper mends the gates on every pass: with runs in the jobs bucket and no gate,
    finding none must not wait out a scan's timeout."""
    await stack.state.queues.put("demo/model", RunQueue())  # a record beside, not a gate
    ctx = Context(state=stack.state, backend=stack.backend, js=stack.js, log=structlog.get_logger())
    began = time.monotonic()
    assert await capacity.heal(ctx, {}, {}, time.time()) == 0
    assert time.monotonic() - began < 1.0
