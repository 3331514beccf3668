"""What every backend must do, written once and run against each backend.

A backend's test module subclasses `BackendContract` and provides:

- `new_backend`: a factory of backend objects that share one store of state
  (a data dir, a cluster namespace), each like a freshly restarted process;
- `running_copies`: an async function counting what actually runs for an
  instance id (processes, pods), without trusting the backend's own records;
- optionally `make_spec`, if the backend cannot run `tests/apps/echo_app.py`
  through `{python}` (the Kubernetes backend will give images instead).

A backend that runs jobs also subclasses `JobContract` and provides:

- `running_job_copies`: an async function counting what actually runs of a
  job (the model's processes, pods), without trusting the backend's records;
- optionally `make_job_spec`, if the backend cannot run `tests/apps/job_model.py`
  through `{python}`. The job tests choose the model's behaviour by its
  arguments (`--exit N`, `--sleep S`; see that file), which a backend without
  real processes may read from `spec.command` to simulate the run.

The `backends` fixture stops every instance and forgets every job left at
the end of a test, and calls `cleanup()` on every backend object it made;
the `watch` fixture starts `watch_jobs` and stops it at the end of a test.
"""

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from handlers.errors import StartFailed
from handlers.ports import Backend, Instance, JobLaunch
from schemas import errors as codes
from schemas.events import JobUpdate
from schemas.spec import AppSpec
from tests.helpers import APPS, wait_for

ECHO_APP = APPS / "echo_app.py"
JOB_MODEL = APPS / "job_model.py"
READY_S = 15.0  # generous: a loaded CI machine may start Python slowly
JOB_S = 20.0  # as generous, for a job's report

MakeSpec = Callable[..., AppSpec]
Factory = Callable[[], Awaitable[Backend]]


def new_id() -> str:
    return f"i-{uuid.uuid4().hex[:16]}"


def new_job_id() -> str:
    return f"j-{uuid.uuid4().hex[:24]}"


def job_spec(*args: str, name: str = "test/model", **fields) -> AppSpec:
    """A job spec that runs the job model with `args`, e.g. `--exit 3` or `--sleep 600`."""
    return AppSpec(name=name, kind="job", command=["{python}", str(JOB_MODEL), *args], **fields)


def launch(job_id: str, spec: AppSpec, inputs: dict | None = None, **fields) -> JobLaunch:
    """What run_request hands the backend: by default small inputs and no outputs."""
    values = {"inputs": {"n": 1} if inputs is None else inputs, "upload_urls": {}}
    values |= {"deadline_s": spec.deadline_s} | fields
    return JobLaunch(job_id=job_id, **values)


def echo_spec(behaviour: str = "serve", name: str = "test/echo", **fields) -> AppSpec:
    """A spec that runs the echo app: `serve`, `exit` (code 3 at once) or `hang` (never listens)."""
    args = {
        "serve": [],
        "exit": ["--crash", "3"],
        "hang": ["--delay", "3600"],
    }[behaviour]
    command = ["{python}", str(ECHO_APP), "--port", "{port}", "--prefix", "{prefix}", *args]
    return AppSpec(name=name, command=command, start_timeout_s=READY_S, **fields)


async def stop_all(backend: Backend) -> None:
    """Stop every instance the backend knows about, and forget every job.

    Cancelling a job stops it; cancelling one that has ended removes what is left
    of it (the local backend keeps a job's files until then): so twice.
    """
    for _ in range(2):
        for instance in await backend.list_instances():
            if instance.kind in ("viz", "warm"):
                await backend.stop_viz(instance.id)
            else:
                await backend.cancel_job(instance.id)


async def find(backend: Backend, instance_id: str) -> Instance | None:
    return next((i for i in await backend.list_instances() if i.id == instance_id), None)


class JobWatch:
    """A running `watch_jobs`, keeping what it reports."""

    def __init__(self, backend: Backend) -> None:
        self.updates: list[JobUpdate] = []
        self.stopping = asyncio.Event()
        self.task = asyncio.create_task(
            backend.watch_jobs(self._report, self.stopping), name="test-job-watch"
        )

    async def _report(self, update: JobUpdate) -> None:
        self.updates.append(update)

    def states(self, job_id: str) -> list[str]:
        """The states reported for a job, in order, repeats dropped."""
        states: list[str] = []
        for update in self.updates:
            if update.job_id == job_id and update.state not in states:
                states.append(update.state)
        return states

    async def until(self, job_id: str, state: str, timeout: float = JOB_S) -> JobUpdate:
        """The first report of `state` for the job, once there is one."""

        def first() -> JobUpdate | None:
            if self.task.done():
                self.task.result()  # a watcher that died says why
                raise AssertionError("the watcher stopped")
            return next((u for u in self.updates if (u.job_id, u.state) == (job_id, state)), None)

        return await wait_for(first, timeout, what=f"{job_id} {state} (saw {self.states(job_id)})")

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.wait_for(self.task, 10)


class BackendContract:
    @pytest.fixture
    def new_backend(self) -> Callable[[], Backend]:
        raise NotImplementedError("a backend's test class provides `new_backend`")

    @pytest.fixture
    def running_copies(self) -> Callable[[str], Awaitable[int]]:
        raise NotImplementedError("a backend's test class provides `running_copies`")

    @pytest.fixture
    def make_spec(self) -> MakeSpec:
        return echo_spec

    @pytest.fixture
    async def backends(self, new_backend) -> AsyncIterator[Factory]:
        made: list[Backend] = []

        async def make() -> Backend:
            backend = new_backend()
            await backend.setup()
            made.append(backend)
            return backend

        yield make
        if made:
            await stop_all(made[-1])
            assert await made[-1].list_instances() == []
        for backend in made:
            await backend.cleanup()

    @pytest.fixture
    async def backend(self, backends: Factory) -> Backend:
        return await backends()

    # -- start, find, stop --

    async def test_start_is_ready_listed_and_reachable(self, backend, make_spec, running_copies):
        spec, iid = make_spec(), new_id()
        await backend.start_viz(iid, spec)
        await backend.wait_ready(iid, spec, READY_S)

        assert backend.url(iid, spec).endswith(f"/apps/{spec.name}/{iid}/")
        instance = await find(backend, iid)
        assert instance is not None
        assert (instance.app, instance.kind, instance.alive, instance.pooled) == (
            spec.name,
            "viz",
            True,
            False,
        )
        assert await running_copies(iid) == 1
        target = await backend.target(iid)
        if target is not None:  # backends the gateway fronts
            app, base = target
            assert app == spec.name
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{base}/apps/{spec.name}/{iid}/api/info") as resp,
            ):
                assert resp.status == 200
                assert (await resp.json())["instance"] == iid

    async def test_start_twice_runs_one_copy(self, backend, make_spec, running_copies):
        spec, iid = make_spec(), new_id()
        await backend.start_viz(iid, spec)
        first = await find(backend, iid)
        await asyncio.gather(*(backend.start_viz(iid, spec) for _ in range(3)))
        await backend.wait_ready(iid, spec, READY_S)
        await backend.start_viz(iid, spec)

        assert await running_copies(iid) == 1
        assert await backend.list_instances() == [first]  # the same one, not a replacement

    async def test_stop_is_idempotent_and_leaves_nothing(self, backend, make_spec, running_copies):
        spec, iid = make_spec(), new_id()
        await backend.start_viz(iid, spec)
        await backend.wait_ready(iid, spec, READY_S)

        await backend.stop_viz(iid)
        assert await running_copies(iid) == 0
        await backend.stop_viz(iid)
        await backend.stop_viz(new_id())  # never started

        assert await find(backend, iid) is None
        assert await backend.target(iid) is None

    async def test_claim_relabels_a_pooled_instance(self, backend, make_spec):
        spec, iid = make_spec(), new_id()
        await backend.start_viz(iid, spec, pooled=True)
        await backend.wait_ready(iid, spec, READY_S)
        assert (await find(backend, iid)).pooled is True

        assert await backend.claim(iid) is True
        assert (await find(backend, iid)).pooled is False
        assert await backend.claim(iid) is True
        assert (await find(backend, iid)).pooled is False
        assert await backend.claim(new_id()) is False  # gone: nothing to claim

    async def test_claim_of_a_stopped_instance_says_it_is_gone(self, backend, make_spec):
        spec, iid = make_spec(), new_id()
        await backend.start_viz(iid, spec, pooled=True)
        await backend.wait_ready(iid, spec, READY_S)
        await backend.stop_viz(iid)
        assert await backend.claim(iid) is False

    async def test_start_twice_keeps_the_pool_label(self, backend, make_spec):
        spec, iid = make_spec(), new_id()
        await backend.start_viz(iid, spec, pooled=True)
        await backend.start_viz(iid, spec)
        assert (await find(backend, iid)).pooled is True

    # -- failures --

    async def test_app_that_exits_fails_to_start(self, backend, make_spec):
        spec, iid = make_spec("exit"), new_id()
        await backend.start_viz(iid, spec)
        with pytest.raises(StartFailed) as failed:
            await backend.wait_ready(iid, spec, READY_S)
        assert failed.value.code == codes.START_FAILED
        assert (await find(backend, iid)).alive is False

    async def test_app_that_never_listens_times_out(self, backend, make_spec, running_copies):
        spec, iid = make_spec("hang"), new_id()
        await backend.start_viz(iid, spec)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(StartFailed) as failed:
            await backend.wait_ready(iid, spec, 0.5)
        assert failed.value.code == codes.START_TIMEOUT
        assert loop.time() - started < 0.5 + 2.5  # the timeout is kept, roughly
        assert await running_copies(iid) == 1  # the caller decides to stop it

    async def test_wait_ready_for_an_unknown_instance_fails(self, backend, make_spec):
        with pytest.raises(StartFailed) as failed:
            await backend.wait_ready(new_id(), make_spec(), 1.0)
        assert failed.value.code == codes.START_FAILED

    # -- restarts of spinyard --

    async def test_a_restarted_backend_finds_and_stops_what_it_left(
        self, backends, make_spec, running_copies
    ):
        old = await backends()
        spec = make_spec()
        shared, warm = new_id(), new_id()
        await old.start_viz(shared, spec)
        await old.start_viz(warm, spec, pooled=True)
        await old.wait_ready(shared, spec, READY_S)
        await old.wait_ready(warm, spec, READY_S)

        new = await backends()  # as after a crash: nothing in memory, same state
        found = {i.id: i for i in await new.list_instances()}
        assert set(found) == {shared, warm}
        assert all(i.alive and i.app == spec.name for i in found.values())
        assert (found[shared].pooled, found[warm].pooled) == (False, True)
        await new.wait_ready(shared, spec, READY_S)  # a redelivered page load
        await new.start_viz(shared, spec)
        assert await running_copies(shared) == 1

        await new.stop_viz(shared)
        await new.stop_viz(warm)
        assert await running_copies(shared) == await running_copies(warm) == 0
        assert await old.list_instances() == []

    async def test_dead_instances_are_listed_as_not_alive(self, backend, make_spec):
        spec, iid = make_spec("exit"), new_id()
        await backend.start_viz(iid, spec)

        async def dead() -> bool:
            instance = await find(backend, iid)
            return instance is not None and not instance.alive

        await wait_for(dead, timeout=READY_S, what="the app to exit")
        assert await backend.target(iid) is None


class JobContract:
    """What every backend that runs jobs must do. Mix into a `BackendContract` subclass."""

    @pytest.fixture
    def running_job_copies(self) -> Callable[[str], Awaitable[int]]:
        raise NotImplementedError("a backend's test class provides `running_job_copies`")

    @pytest.fixture
    def make_job_spec(self) -> MakeSpec:
        return job_spec

    @pytest.fixture
    async def watch(self, backend) -> AsyncIterator[Callable[..., JobWatch]]:
        """Start `watch_jobs` on `backend` (or another backend object); stopped at the end."""
        made: list[JobWatch] = []

        def start(on: Backend | None = None) -> JobWatch:
            made.append(JobWatch(on or backend))
            return made[-1]

        yield start
        for watcher in made:
            await watcher.stop()

    async def test_a_job_runs_succeeds_and_is_listed(
        self, backend, watch, make_job_spec, running_job_copies
    ):
        spec, jid, watcher = make_job_spec(), new_job_id(), watch()
        await backend.submit_job(launch(jid, spec), spec)
        instance = await find(backend, jid)
        assert (instance.app, instance.kind) == (spec.name, "job")

        done = await watcher.until(jid, "succeeded")
        assert done.exit_code == 0
        assert watcher.states(jid) in (["running", "succeeded"], ["succeeded"])
        assert await running_job_copies(jid) == 0

        async def ended() -> bool:
            return (await find(backend, jid)).alive is False

        await wait_for(ended, JOB_S, what="the job to be listed as ended")

    async def test_a_failing_job_reports_its_exit_code_and_log_tail(
        self, backend, watch, make_job_spec
    ):
        spec, jid, watcher = make_job_spec("--exit", "3"), new_job_id(), watch()
        await backend.submit_job(launch(jid, spec), spec)
        failed = await watcher.until(jid, "failed")
        assert failed.exit_code == 3
        assert "job_model: failing with 3" in failed.log_tail

    async def test_a_job_past_its_deadline_is_stopped(
        self, backend, watch, make_job_spec, running_job_copies
    ):
        spec, jid, watcher = make_job_spec("--sleep", "600", deadline_s=1.0), new_job_id(), watch()
        await backend.submit_job(launch(jid, spec), spec)
        await watcher.until(jid, "running")
        await watcher.until(jid, "timed_out")
        assert await running_job_copies(jid) == 0

    async def test_cancel_stops_a_job_and_is_idempotent(
        self, backend, watch, make_job_spec, running_job_copies
    ):
        spec, jid, watcher = make_job_spec("--sleep", "600"), new_job_id(), watch()
        await backend.submit_job(launch(jid, spec), spec)
        await watcher.until(jid, "running")
        assert await running_job_copies(jid) == 1

        await backend.cancel_job(jid)
        assert await running_job_copies(jid) == 0
        await watcher.until(jid, "cancelled")
        await backend.cancel_job(jid)  # ended: what is left goes
        assert await find(backend, jid) is None
        await backend.cancel_job(jid)
        await backend.cancel_job(new_job_id())  # never submitted

    async def test_submitting_a_job_again_runs_it_once(
        self, backends, watch, make_job_spec, running_job_copies
    ):
        one, two = await backends(), await backends()
        spec, jid = make_job_spec("--sleep", "600"), new_job_id()
        watcher = watch(one)
        await asyncio.gather(*(b.submit_job(launch(jid, spec), spec) for b in (one, two, one)))
        await one.submit_job(launch(jid, spec), spec)
        await watcher.until(jid, "running")
        assert await running_job_copies(jid) == 1
        assert [i.id for i in await two.list_instances()] == [jid]

    async def test_a_finished_job_is_not_run_again(self, backend, watch, make_job_spec):
        spec, jid, watcher = make_job_spec(), new_job_id(), watch()
        await backend.submit_job(launch(jid, spec), spec)
        await watcher.until(jid, "succeeded")

        async def ended() -> Instance | None:  # reported first, then its runner (or pod) ends
            found = await find(backend, jid)
            return found if found is not None and not found.alive else None

        before = await wait_for(ended, what="the finished job's runner gone")
        await backend.submit_job(launch(jid, spec), spec)
        assert await find(backend, jid) == before

    async def test_a_watcher_started_later_reports_what_it_missed(
        self, backend, watch, make_job_spec
    ):
        spec, jid = make_job_spec("--exit", "4"), new_job_id()
        await backend.submit_job(launch(jid, spec), spec)

        async def ended() -> bool:
            return (await find(backend, jid)).alive is False

        await wait_for(ended, JOB_S, what="the job to end")
        failed = await watch().until(jid, "failed")
        assert failed.exit_code == 4


class WarmJobContract:
    """What every backend with warm runners (`warm_runners`) must do. Mix into a class that
    has the `JobContract`'s fixtures."""

    async def _warm(self, backend: Backend, spec: AppSpec) -> str:
        instance_id = new_id()
        await backend.start_warm(instance_id, spec, READY_S)
        return instance_id

    async def test_a_warm_runner_is_listed_claimed_and_runs_one_job(
        self, backend, watch, make_job_spec, running_job_copies
    ):
        spec, jid, watcher = make_job_spec(pool={"size": 1}), new_job_id(), watch()
        warm = await self._warm(backend, spec)
        await backend.start_warm(warm, spec, READY_S)  # again: still one
        listed = await find(backend, warm)
        assert (listed.kind, listed.app, listed.pooled, listed.alive) == (
            "warm",
            spec.name,
            True,
            True,
        )
        assert await backend.claim(warm)
        assert await backend.submit_warm(launch(jid, spec), spec, warm)
        done = await watcher.until(jid, "succeeded")
        assert done.exit_code == 0
        assert await running_job_copies(jid) == 0
        assert await find(backend, warm) is None  # used up
        assert not await backend.claim(warm)

    async def test_a_warm_run_past_its_deadline_or_cancelled_is_stopped(
        self, backend, watch, make_job_spec, running_job_copies
    ):
        watcher = watch()
        late = make_job_spec("--sleep", "600", deadline_s=1.0, pool={"size": 1})
        slow = make_job_spec("--sleep", "600", pool={"size": 1})
        late_id, slow_id = new_job_id(), new_job_id()
        for jid, spec in ((late_id, late), (slow_id, slow)):
            warm = await self._warm(backend, spec)
            assert await backend.claim(warm)
            handed = await backend.submit_warm(launch(jid, spec), spec, warm)
            assert handed
            if handed != "running":  # (a start answered "running" is the caller's to record)
                await watcher.until(jid, "running")
        await backend.cancel_job(slow_id)
        await watcher.until(slow_id, "cancelled")
        await watcher.until(late_id, "timed_out")
        assert await running_job_copies(late_id) == await running_job_copies(slow_id) == 0

    async def test_a_stopped_or_unknown_warm_runner_takes_no_run(
        self, backend, watch, make_job_spec
    ):
        spec = make_job_spec(pool={"size": 1})
        warm = await self._warm(backend, spec)
        await backend.stop_viz(warm)
        await backend.stop_viz(warm)
        assert await find(backend, warm) is None
        assert not await backend.claim(warm)
        jid = new_job_id()
        assert not await backend.submit_warm(launch(jid, spec), spec, warm)
        assert not await backend.submit_warm(launch(jid, spec), spec, new_id())
        assert await find(backend, jid) is None  # not started: the caller starts it cold
