"""The handlers on the Kubernetes backend: page load to ready, reconcile, a run, a warm run.

Real nats-server and handlers; the Kubernetes API is kmock's emulator with
simulated controllers (kubesim), as in test_backend.py.
"""

import asyncio
import contextlib

import msgpack
import pytest

from dispatcher import bus, compose
from dispatcher.backends.kubernetes import resources
from dispatcher.runtime import Handlers
from handlers.registry import default_registry
from schemas import subjects
from schemas.codec import encode
from schemas.events import PageLoad, RunRequest, job_id_for
from tests.backends.contract import job_spec as model_spec
from tests.backends.kubernetes.support import IMAGE, PUBLIC_URL, job_spec, k8s_spec
from tests.helpers import wait_for


@contextlib.asynccontextmanager
async def handlers_on(settings, backend):
    nc = await bus.connect(settings.nats, "test-k8s-handlers")
    seen: dict[str, list[dict]] = {}

    async def on_status(msg):
        seen.setdefault(msg.subject, []).append(msgpack.unpackb(msg.data))

    await nc.subscribe(f"{subjects.STATUS}.>", cb=on_status)
    state = await compose.provision(nc.jetstream(), settings, default_registry.select(None))
    service = Handlers(settings, nc=nc, state=state, backend=backend)
    task = asyncio.create_task(service.run(), name="handlers-on-k8s")
    await asyncio.wait_for(service.ready.wait(), 10)
    state = await bus.ensure_state(nc.jetstream(), settings.nats)
    try:
        yield nc.jetstream(), state, seen
    finally:
        service.stop()
        await task
        await nc.close()


def last(seen, subject):
    return (seen.get(subject) or [{}])[-1]


@pytest.fixture
async def k8s(make):
    return await make()


async def test_page_load_makes_a_deployment_and_reports_ready_with_pod_times(settings, k8s, server):
    async with handlers_on(settings, k8s) as (js, state, seen):
        await state.apps.put("test/echo", k8s_spec(name="test/echo"))
        event = PageLoad(app="test/echo", session="s-1")
        await js.publish(subjects.event("page_load", event.app), encode(event))
        subject = subjects.app_status("test/echo")
        await wait_for(lambda: last(seen, subject).get("state") == "ready", what="ready")
        ready = last(seen, subject)
    assert ready["url"].startswith(PUBLIC_URL.rstrip("/") + "/apps/test/echo/i-")
    assert {"scheduled", "started", "ready"} <= set(ready["phases"])
    deployments = server.objects_of(resources.DEPLOYMENTS)
    assert len(deployments) == 1
    labels = next(iter(deployments.values()))["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "spinyard"
    assert labels["spinyard.io/instance"] == ready["instance"]


async def test_reaper_removes_managed_objects_no_record_names(settings, k8s, server):
    spec = k8s_spec(name="test/echo")
    await k8s.start_viz("i-0000000000000abc", spec)  # started, then its record "lost"
    await wait_for(lambda: server.objects_of(resources.DEPLOYMENTS), what="orphan deployment")
    async with handlers_on(settings, k8s) as (_js, state, _seen):
        await state.apps.put(spec.name, spec)
        await wait_for(
            lambda: not server.objects_of(resources.DEPLOYMENTS),
            timeout=15,
            what="orphan deployment reaped",
        )
    assert not server.objects_of(resources.SERVICES)


async def test_a_run_goes_queued_running_succeeded_as_a_job(settings, k8s, server, cluster):
    async with handlers_on(settings, k8s) as (js, state, seen):
        # A run the simulated kubelet keeps running until the test ends it: it ends
        # once `running` is published, so the run cannot end before the watcher reports
        # it running (it would then rightly report `succeeded` only: job_reports.py).
        await state.apps.put("test/model", job_spec(name="test/model"))
        event = RunRequest(app="test/model", session="s-1", inputs={"n": 2})
        await js.publish(subjects.event("run_request", event.app), encode(event))
        job_id = job_id_for(event.app, event.session, None, event.id)
        subject = subjects.job_status(job_id)
        await wait_for(lambda: last(seen, subject).get("state") == "running", what="running")
        await wait_for(lambda: cluster.running_pods(job_id) == 1, what="the job's pod")
        await cluster.finish_job(job_id)
        await wait_for(
            lambda: last(seen, subject).get("state") == "succeeded",
            timeout=15,
            what="run succeeded",
        )
        states = [s["state"] for s in seen[subject]]
    assert states[0] == "queued" and states[-1] == "succeeded" and "running" in states
    jobs = server.objects_of(resources.JOBS)
    assert any(
        j["metadata"]["labels"].get("spinyard.io/job") == job_id or job_id in j["metadata"]["name"]
        for j in jobs.values()
    )


async def test_a_run_takes_a_warm_pod_says_so_and_the_pool_refills(settings, k8s, server):
    spec = model_spec(image=IMAGE, name="test/warm", pool={"size": 1}, deadline_s=30)
    async with handlers_on(settings, k8s) as (js, state, seen):
        await state.apps.put(spec.name, spec)

        async def warm_member() -> str | None:
            index = await state.pools.get(spec.name)
            return index.warm[0].instance if index and index.warm else None

        first = await wait_for(warm_member, timeout=30, what="a warm runner pod")
        event = RunRequest(app=spec.name, session="s-1", inputs={"n": 2})
        await js.publish(subjects.event("run_request", event.app), encode(event))
        job_id = job_id_for(event.app, event.session, None, event.id)
        subject = subjects.job_status(job_id)
        await wait_for(
            lambda: last(seen, subject).get("state") == "succeeded", timeout=30, what="succeeded"
        )
        done = last(seen, subject)
        second = await wait_for(
            lambda: _other_member(state, spec.name, first), timeout=30, what="the pool refilled"
        )
        await wait_for(
            lambda: first not in server.objects_of(resources.PODS), what="the used pod deleted"
        )
    assert done["phases"]["warm"] is True
    assert seen[subject][0]["state"] == "queued"
    assert not server.objects_of(resources.JOBS)  # no Job: the run was the pod's
    pods = server.objects_of(resources.PODS)
    assert first not in pods  # used, its end reported: deleted
    assert second != first and pods[second]["metadata"]["labels"]["spinyard.io/pooled"] == "true"


async def _other_member(state, app: str, used: str) -> str | None:
    index = await state.pools.get(app)
    return next((m.instance for m in index.warm if m.instance != used), None) if index else None
