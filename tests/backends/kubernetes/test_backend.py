"""The Kubernetes backend against kmock's API emulator (kubesim).

The shared backend contract runs first, with simulated controllers standing
in for the Deployment controller and the kubelet. Then what only this
backend does: the objects it creates, API errors, watches that drop and
resume, runs, the RBAC Role, configuration, and the bench script.
"""

import asyncio
import base64
import json
import subprocess
import sys

import kmock
import pytest
import yaml
from kubernetes import client

import kubesim
from dispatcher.backends.base import JobLaunch
from dispatcher.backends.kubernetes import clientconfig, objects
from dispatcher.backends.kubernetes.backend import KubernetesBackend
from dispatcher.backends.kubernetes.resources import (
    DEPLOYMENTS,
    INGRESSES,
    INGRESSROUTES,
    JOBS,
    PODS,
    SECRETS,
    SERVICES,
)
from dispatcher.compose import make_backend
from dispatcher.settings import Settings
from handlers.errors import (
    PermanentError,
    PublicError,
    RetryableError,
    StartFailed,
    public_info,
)
from kubesim import controllers
from schemas import errors as codes
from tests.backends.contract import (
    BackendContract,
    JobContract,
    WarmJobContract,
    find,
    new_id,
    new_job_id,
)
from tests.backends.contract import job_spec as model_spec
from tests.backends.kubernetes.support import (
    IMAGE,
    PUBLIC_URL,
    WAIT_S,
    job_spec,
    k8s_spec,
    sim_spec,
    write_kubeconfig,
)
from tests.helpers import ROOT, wait_for


class TestKubernetesBackend(BackendContract, JobContract, WarmJobContract):
    """The shared contracts, with simulated controllers (kubesim) instead of pods.

    `target()` is None here (no gateway proxy), so the contract's HTTP check of
    the app is skipped by the contract itself; readiness is what the simulated
    kubelet reports, not a real probe, and a job's run is simulated from the job
    model's arguments (its exit code, its sleep against the Job's deadline).
    Warm runners are real: kubesim runs a bare pod's command as a local process
    at a loopback pod IP, so the runner, the launch and the model really run.
    """

    @pytest.fixture
    def new_backend(self, server, cluster, k8s_settings):
        config = kubesim.configuration(server)
        return lambda: KubernetesBackend(k8s_settings, PUBLIC_URL, configuration=config)

    @pytest.fixture
    def running_copies(self, cluster):
        async def count(instance_id: str) -> int:
            return cluster.running_pods(instance_id)

        return count

    @pytest.fixture
    def make_spec(self):
        return k8s_spec

    @pytest.fixture
    def running_job_copies(self, cluster):
        async def count(job_id: str) -> int:
            return cluster.running_pods(job_id)

        return count

    @pytest.fixture
    def make_job_spec(self):
        return lambda *args, **fields: model_spec(*args, **({"image": IMAGE} | fields))


# -- what is created --


async def test_a_viz_instance_is_a_deployment_a_service_and_a_route(backend, server):
    spec, iid = k8s_spec(entry_path="main"), new_id()
    await backend.start_viz(iid, spec, pooled=True)

    deployment = server.objects_of(DEPLOYMENTS)[iid]
    built = objects.make_viz_deployment(
        spec, iid, template=backend._templates["viz"], created_at=0.0, pooled=True
    )
    expected = client.ApiClient().sanitize_for_serialization(built)
    assert deployment["spec"] == expected["spec"]
    assert deployment["metadata"]["labels"] == expected["metadata"]["labels"]
    created = objects.parse_rfc3339(deployment["metadata"]["annotations"][objects.CREATED_AT])
    assert abs(created - objects.parse_rfc3339(deployment["metadata"]["creationTimestamp"])) < 2

    owner = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": iid,
            "uid": deployment["metadata"]["uid"],
            "blockOwnerDeletion": False,
        }
    ]
    service = server.objects_of(SERVICES)[iid]
    route = server.objects_of(INGRESSROUTES)[iid]
    assert service["metadata"]["ownerReferences"] == route["metadata"]["ownerReferences"] == owner
    assert service["spec"]["selector"] == {
        "app.kubernetes.io/managed-by": "spinyard",
        "spinyard.io/instance": iid,
    }
    assert route["spec"]["routes"][0]["match"] == f"PathPrefix(`/apps/test/echo/{iid}/`)"
    assert server.objects_of(INGRESSES) == {}
    assert backend.url(iid, spec) == f"https://spinyard.example.org/apps/test/echo/{iid}/main"


async def test_ingress_routes_when_asked(make, server):
    backend = await make(route_kind="ingress", ingress_class="nginx", host="apps.example.org")
    iid = new_id()
    await backend.start_viz(iid, k8s_spec())
    ingress = server.objects_of(INGRESSES)[iid]
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["rules"][0]["host"] == "apps.example.org"
    assert server.objects_of(INGRESSROUTES) == {}
    await backend.stop_viz(iid)
    assert server.objects_of(INGRESSES) == server.objects_of(SERVICES) == {}


async def test_a_second_start_meets_409_and_creates_nothing_new(backend, server):
    spec, iid = k8s_spec(), new_id()
    await backend.start_viz(iid, spec)
    uid = server.objects_of(DEPLOYMENTS)[iid]["metadata"]["uid"]
    backend.api.calls.clear()

    await backend.start_viz(iid, spec, pooled=True)
    assert server.objects_of(DEPLOYMENTS)[iid]["metadata"]["uid"] == uid
    assert "spinyard.io/pooled" not in server.objects_of(DEPLOYMENTS)[iid]["metadata"]["labels"]
    assert dict(backend.api.calls) == {
        ("create", "apps", "deployments"): 1,  # 409
        ("get", "apps", "deployments"): 1,  # for its uid, to own the others
        ("create", "", "services"): 1,  # 409
        ("create", "traefik.io", "ingressroutes"): 1,  # 409
    }


async def test_a_start_recreates_a_lost_service_and_route(backend, server):
    iid = new_id()
    await backend.start_viz(iid, k8s_spec())
    await backend.api.delete(SERVICES, iid)
    await backend.api.delete(INGRESSROUTES, iid)
    await backend.start_viz(iid, k8s_spec())
    assert iid in server.objects_of(SERVICES) and iid in server.objects_of(INGRESSROUTES)


async def test_no_image_fails_the_start(backend, server):
    with pytest.raises(StartFailed, match="needs `image`") as failed:
        await backend.start_viz(new_id(), k8s_spec(image=None))
    assert failed.value.code == codes.START_FAILED
    assert server.objects_of(DEPLOYMENTS) == {}


# -- readiness, from the watches --


async def test_wait_ready_wakes_on_the_watch_event(backend, cluster):
    spec, iid = sim_spec("hang"), new_id()
    await backend.start_viz(iid, spec)
    waiting = asyncio.create_task(backend.wait_ready(iid, spec, WAIT_S))
    done, _ = await asyncio.wait([waiting], timeout=0.3)
    assert not done  # running, not ready: it waits

    pod = next(iter(cluster.server.objects_of(PODS)))
    started = asyncio.get_running_loop().time()
    await cluster.patch_status(PODS, pod, controllers.pod_running("app", True))
    await asyncio.wait_for(waiting, WAIT_S)
    assert asyncio.get_running_loop().time() - started < 0.5  # an event, not a poll
    assert set(backend.phases(iid)) == {"scheduled", "started", "ready"}


async def test_a_crash_fails_with_exit_code_and_log_tail(backend, cluster):
    spec, iid = sim_spec("crash:3"), new_id()
    await backend.start_viz(iid, spec)
    pod = f"{iid}-"
    with pytest.raises(StartFailed) as failed:
        await backend.wait_ready(iid, spec, WAIT_S)
    assert failed.value.code == codes.START_FAILED
    assert failed.value.message == "the app exited with code 3 before it was ready"
    assert failed.value.log_tail == "starting\nboom: exiting with 3"
    log = next(r for r in cluster.server if r.subresource == "log")
    assert log.name.startswith(pod)
    assert log.params == {"container": "app", "tailLines": "5", "previous": "true"}


async def test_an_image_that_cannot_be_pulled_fails_at_once(backend):
    spec, iid = sim_spec("pull_error"), new_id()
    await backend.start_viz(iid, spec)
    with pytest.raises(StartFailed, match="could not start: ImagePullBackOff"):
        await backend.wait_ready(iid, spec, WAIT_S)


async def test_the_timeout_says_what_it_waited_for(backend):
    spec, iid = sim_spec("unschedulable"), new_id()
    await backend.start_viz(iid, spec)
    with pytest.raises(StartFailed) as failed:
        await backend.wait_ready(iid, spec, 0.3)
    assert failed.value.code == codes.START_TIMEOUT
    assert "not scheduled: 0/3 nodes are available: 3 Insufficient cpu." in failed.value.message


async def test_a_running_pod_whose_probe_fails_times_out_with_its_log_tail(backend, cluster):
    """The kubelet's httpGet probe (200-399 is ready) never passes: the timeout says the
    pod runs but its probe failed, in whole seconds, and carries the pod's log tail."""
    spec, iid = sim_spec("hang"), new_id()
    await backend.start_viz(iid, spec)
    with pytest.raises(StartFailed) as failed:
        await backend.wait_ready(iid, spec, 0.6)
    assert failed.value.code == codes.START_TIMEOUT
    assert failed.value.message == (
        "the app did not become ready within 1 s: it runs, but its readiness probe has not"
        " passed (the pod's Events hold its answers)"
    )
    assert failed.value.log_tail.startswith(f"{objects.object_name(iid)}-")  # its pod's log


async def test_an_instance_stopped_while_starting_fails_the_wait(backend):
    spec, iid = sim_spec("hang"), new_id()
    await backend.start_viz(iid, spec)
    waiting = asyncio.create_task(backend.wait_ready(iid, spec, WAIT_S))
    await asyncio.sleep(0.1)
    await backend.stop_viz(iid)
    with pytest.raises(StartFailed, match=r"not running|was stopped"):
        await asyncio.wait_for(waiting, WAIT_S)


# -- watches that drop --


def watches_of(server, res) -> list[dict]:
    """The backend's watch requests for `res` (the simulated controllers send no selector)."""
    return [
        r.params
        for r in server
        if r.action == kmock.action.WATCH
        and r.resource == kubesim.ref(res)
        and "labelSelector" in r.params
    ]


async def test_a_dropped_watch_resumes_from_its_resource_version(backend, server, cluster):
    spec, first, second = k8s_spec(), new_id(), new_id()
    await backend.start_viz(first, spec)
    await backend.wait_ready(first, spec, WAIT_S)
    lists = backend.api.calls[("list", "apps", "deployments")]
    await wait_for(lambda: server.open_watches(DEPLOYMENTS) == 1, what="the watch")

    server.drop_watches()
    await wait_for(lambda: len(watches_of(server, DEPLOYMENTS)) == 2, what="a new watch")
    resumed = watches_of(server, DEPLOYMENTS)[-1]["resourceVersion"]
    assert resumed.isdigit() and int(resumed) > 1  # from where it was, not from scratch

    # A change only the Deployment watch can tell: Kubernetes gives up on the instance.
    hang = sim_spec("hang")
    await backend.start_viz(second, hang)
    waiting = asyncio.create_task(backend.wait_ready(second, hang, WAIT_S))
    await asyncio.sleep(0.1)
    await cluster.patch_status(DEPLOYMENTS, second, controllers.deployment_failed())
    with pytest.raises(StartFailed, match="gave up"):
        await waiting
    assert backend.api.calls[("list", "apps", "deployments")] == lists  # and not listed again


async def test_a_watch_too_old_lists_again_and_forgets_what_went(backend, server, cluster):
    spec, gone, kept = sim_spec("hang"), new_id(), new_id()
    await backend.start_viz(gone, spec)
    await backend.start_viz(kept, spec)
    waiting = asyncio.create_task(backend.wait_ready(kept, spec, WAIT_S))
    await wait_for(lambda: server.open_watches(DEPLOYMENTS) == 1, what="the watch")
    lists = backend.api.calls[("list", "apps", "deployments")]

    # While the watch is down, `gone` is deleted and history compacted: 410, then a list.
    with server.paused_watches():
        server.drop_watches()
        await cluster.request("DELETE", DEPLOYMENTS.path(kubesim.NAMESPACE, gone))
        server.compact()
    await wait_for(
        lambda: backend.api.calls[("list", "apps", "deployments")] > lists, what="a relist"
    )
    with pytest.raises(StartFailed, match="not running"):
        await backend.wait_ready(gone, spec, 1.0)  # a stale cache would time out instead
    assert not waiting.done()
    waiting.cancel()


async def test_a_watch_answered_410_lists_again(backend, server):
    spec, iid = k8s_spec(), new_id()
    await backend.start_viz(iid, spec)
    await backend.wait_ready(iid, spec, WAIT_S)
    await wait_for(lambda: server.open_watches(DEPLOYMENTS) == 1, what="the watch")
    lists = backend.api.calls[("list", "apps", "deployments")]

    server.fail("watch", DEPLOYMENTS, 410, message="too old resource version")
    server.drop_watches()
    await wait_for(
        lambda: backend.api.calls[("list", "apps", "deployments")] == lists + 1, what="a relist"
    )
    await wait_for(lambda: server.open_watches(DEPLOYMENTS) == 1, what="the watch again")


async def test_a_died_informer_fails_the_wait_and_the_next_wait_starts_it_again(backend, cluster):
    spec, iid = sim_spec("hang"), new_id()
    await backend.start_viz(iid, spec)
    await wait_for(lambda: cluster.server.objects_of(PODS), what="the pod")
    broken = [True]

    def update(pod: dict) -> None:  # a bug in what the backend registered
        if broken[0]:
            raise RuntimeError("a handler failed")

    backend._pods.on(update, lambda pod: None)
    with pytest.raises(PermanentError, match=r"watching pods failed: RuntimeError") as failed:
        await backend.wait_ready(iid, spec, WAIT_S)
    assert not isinstance(failed.value, RetryableError)
    assert not backend._pods.running

    broken[0] = False
    waiting = asyncio.create_task(backend.wait_ready(iid, spec, WAIT_S))
    await wait_for(lambda: backend._pods.running, what="the informer again")
    pod = next(iter(cluster.server.objects_of(PODS)))
    await cluster.patch_status(PODS, pod, controllers.pod_running("app", True))
    await asyncio.wait_for(waiting, WAIT_S)


# -- API errors --


async def test_5xx_and_429_are_retried(backend, server):
    server.fail("list", DEPLOYMENTS, 503, times=1)
    server.fail("list", JOBS, 429, headers={"Retry-After": "0.01"})
    assert await backend.list_instances() == []
    assert backend.api.calls[("list", "apps", "deployments")] == 2
    assert backend.api.calls[("list", "batch", "jobs")] == 2


async def test_retries_are_bounded(backend, server):
    iid = new_id()
    await backend.start_viz(iid, k8s_spec(), pooled=True)
    server.fail("patch", DEPLOYMENTS, 500, times=10)
    with pytest.raises(RetryableError, match=r"did not patch deployments\.apps after 3 tries"):
        await backend.claim(iid)
    assert backend.api.calls[("patch", "apps", "deployments")] == 3


async def test_a_timeout_is_retried(make, server):
    backend = await make(api_timeout_s=0.2)
    iid = new_id()
    await backend.start_viz(iid, k8s_spec())
    server.fail("get", DEPLOYMENTS, 500, delay=1.0)  # no answer within the timeout
    assert await backend.api.get(DEPLOYMENTS, iid) is not None
    assert backend.api.calls[("get", "apps", "deployments")] == 2


async def test_a_create_that_timed_out_but_happened_is_found(make, server):
    backend = await make(api_timeout_s=0.2)
    server.fail("create", DEPLOYMENTS, 500, delay=1.0)  # applied, but no answer in time
    iid = new_id()
    await backend.start_viz(iid, k8s_spec())  # retried: 409, so it reads it
    assert list(server.objects_of(DEPLOYMENTS)) == [iid]
    assert iid in server.objects_of(SERVICES)


async def test_404_on_delete_is_done(backend):
    await backend.stop_viz(new_id())
    await backend.cancel_job(new_job_id())
    assert backend.api.calls[("delete", "apps", "deployments")] == 1


async def test_403_names_the_missing_permission(backend, server):
    server.fail("create", SERVICES, 403, message='services is forbidden: User "x" cannot create')
    with pytest.raises(PermanentError) as failed:
        await backend.start_viz(new_id(), k8s_spec())
    assert not isinstance(failed.value, RetryableError)
    assert failed.value.code == codes.FORBIDDEN
    assert failed.value.message.startswith(
        "spinyard's service account may not create services in spinyard-apps: services is "
        'forbidden: User "x" cannot create'
    )


@pytest.mark.parametrize("verb", ["list", "watch"])
async def test_403_on_the_watch_fails_the_wait(backend, server, verb):
    spec, iid = sim_spec("hang"), new_id()
    await backend.start_viz(iid, spec)
    server.fail(verb, PODS, 403, times=100)
    with pytest.raises(PermanentError, match=f"may not {verb} pods in spinyard-apps") as failed:
        await backend.wait_ready(iid, spec, WAIT_S)
    assert failed.value.code == codes.FORBIDDEN


async def test_a_refused_object_fails_the_start_for_operators_eyes_only(backend, server):
    """The refusal names the namespace and the API's reason: a permanent failure whose
    text goes to the logs and the dead letter, never to a page (not a PublicError)."""
    server.fail("create", DEPLOYMENTS, 422, message="spec.template: Invalid value")
    with pytest.raises(
        PermanentError, match=r"refused to create deployments\.apps.*422.*Invalid"
    ) as e:
        await backend.start_viz(new_id(), k8s_spec())
    assert not isinstance(e.value, PublicError)
    assert public_info(e.value).code == codes.INTERNAL


async def test_a_missing_resource_type_is_an_error_not_nothing(backend, server):
    server.fail("create", INGRESSROUTES, 404, message="the server could not find the resource")
    with pytest.raises(PermanentError, match=r"does the cluster serve ingressroutes\.traefik\.io"):
        await backend.start_viz(new_id(), k8s_spec())
    server.fail("list", JOBS, 404, message="the server could not find the requested resource")
    with pytest.raises(PermanentError, match=r"refused to list jobs\.batch .*404"):
        await backend.list_instances()


# -- label selectors: the server applies them --


async def test_lists_find_only_what_the_selector_selects(backend, cluster):
    # Everything of a viz instance but the managed-by label: only the selector excludes it.
    iid, stranger = new_id(), new_id()
    await backend.start_viz(iid, k8s_spec())
    labels = {"app.kubernetes.io/component": "viz", "spinyard.io/instance": stranger}
    meta = {"name": stranger, "labels": labels | {"spinyard.io/app": "test.echo"}}
    body = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": {}}
    await cluster.request("POST", DEPLOYMENTS.path(kubesim.NAMESPACE), body)
    assert [i.id for i in await backend.list_instances()] == [iid]


async def test_an_instance_that_stops_being_ours_is_gone_to_the_watch(backend, cluster):
    spec, iid = sim_spec("hang"), new_id()
    await backend.start_viz(iid, spec)
    waiting = asyncio.create_task(backend.wait_ready(iid, spec, WAIT_S))
    await asyncio.sleep(0.1)
    # The server now sends the watch DELETED for it (it no longer matches the selector).
    unlabel = {"metadata": {"labels": {"app.kubernetes.io/managed-by": None}}}
    await cluster.request("PATCH", DEPLOYMENTS.path(kubesim.NAMESPACE, iid), unlabel)
    with pytest.raises(StartFailed, match="not running"):
        await asyncio.wait_for(waiting, WAIT_S)


# -- reconcile support --


async def test_list_instances_finds_ours_by_label_only(backend, server, cluster):
    viz, warm = new_id(), new_id()
    await backend.start_viz(viz, k8s_spec())
    await backend.start_viz(warm, k8s_spec(), pooled=True)
    stranger = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "not-ours", "labels": {"spinyard.io/instance": "i-0000000000000000"}},
        "spec": {},
    }
    await cluster.request("POST", DEPLOYMENTS.path(kubesim.NAMESPACE), stranger)

    found = {i.id: i for i in await backend.list_instances()}
    assert set(found) == {viz, warm}
    assert (found[viz].pooled, found[warm].pooled) == (False, True)
    assert all(i.kind == "viz" and i.app == "test/echo" and i.alive for i in found.values())

    await backend.stop_viz(viz)
    await backend.stop_viz(warm)
    assert set(server.objects_of(DEPLOYMENTS)) == {"not-ours"}
    assert server.objects_of(SERVICES) == server.objects_of(INGRESSROUTES) == {}
    deletes = [  # the backend's (the simulated garbage collector sends no options)
        r for r in server if r.action == kmock.action.DELETE and r.data is not None
    ]
    assert len(deletes) == 6  # three objects each; no pod: they were viz instances
    assert {r.data["propagationPolicy"] for r in deletes} == {"Background"}


async def test_lists_are_paged(make, server):
    backend = await make(list_page_size=2)
    ids = {new_id() for _ in range(5)}
    for iid in ids:
        await backend.start_viz(iid, k8s_spec())
    backend.api.calls.clear()
    assert {i.id for i in await backend.list_instances()} == ids
    assert backend.api.calls[("list", "apps", "deployments")] == 3


# -- runs --


def launch_for(job_id: str, deadline_s: float = 60.0) -> JobLaunch:
    return JobLaunch(
        job_id=job_id,
        inputs={"n": 1},
        upload_urls={"out.txt": "http://minio.test/results/out.txt?sig=1"},
        deadline_s=deadline_s,
    )


async def reports_until(backend, predicate):
    """Run watch_jobs until the reports so far satisfy `predicate`; return them."""
    seen, stopping = [], asyncio.Event()

    async def report(update) -> None:
        seen.append(update)
        if predicate(seen):
            stopping.set()

    await asyncio.wait_for(backend.watch_jobs(report, stopping), WAIT_S)
    return seen


async def test_a_run_is_a_job_with_an_owned_secret(backend, server, cluster):
    job_id = new_job_id()
    await backend.submit_job(launch_for(job_id, 90.5), job_spec())
    await backend.submit_job(launch_for(job_id, 90.5), job_spec())  # idempotent

    job = server.objects_of(JOBS)[job_id]
    secret = server.objects_of(SECRETS)[f"{job_id}-run"]
    assert job["spec"]["suspend"] is False  # resumed once its Secret existed
    assert job["spec"]["activeDeadlineSeconds"] == 91
    assert job["spec"]["backoffLimit"] == 0
    assert secret["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": job_id,
            "uid": job["metadata"]["uid"],
            "blockOwnerDeletion": False,
        }
    ]
    assert "stringData" not in secret  # the API server folds it into data
    assert {k: base64.b64decode(v).decode() for k, v in secret["data"].items()} == {
        "inputs.json": '{"n": 1}',
        "uploads.json": '{"out.txt": "http://minio.test/results/out.txt?sig=1"}',
    }
    creates = [r.resource.plural for r in server if r.action == kmock.action.CREATE]
    assert creates[:2] == ["jobs", "secrets"]  # the Secret is made after the Job it belongs to

    await wait_for(lambda: cluster.running_pods(job_id) == 1, what="the job's pod")
    instance = await find(backend, job_id)
    assert (instance.kind, instance.app, instance.alive) == ("job", "test/model", True)


async def test_a_run_reports_running_then_succeeded(backend, cluster):
    job_id = new_job_id()
    await backend.submit_job(launch_for(job_id), job_spec())

    seen, stopping = [], asyncio.Event()

    async def report(update) -> None:
        seen.append(update)
        if update.state == "running":
            # The run ends only once `running` is reported. A run that ends before
            # the watcher takes its `running` change is reported `succeeded` only, and
            # rightly so: reports are states, not transitions (job_reports.py), and the
            # job_update handler moves a run from queued to succeeded. Finishing it
            # independently of the reports made this test race the watcher.
            await _finish_after_running(cluster, job_id)
        elif update.state == "succeeded":
            stopping.set()

    await asyncio.wait_for(backend.watch_jobs(report, stopping), WAIT_S)
    assert [(u.job_id, u.state, u.exit_code) for u in seen] == [
        (job_id, "running", None),
        (job_id, "succeeded", 0),
    ]
    assert (await find(backend, job_id)).alive is False


async def _finish_after_running(cluster, job_id, **how):
    await wait_for(lambda: cluster.running_pods(job_id) == 1, what="the job's pod")
    if how.get("expire"):
        await cluster.expire_job(job_id, log=how.get("log"))
    else:
        await cluster.finish_job(job_id, how.get("exit_code", 0), log=how.get("log"))


async def test_a_failed_run_reports_its_exit_code_and_log_tail(backend, cluster):
    job_id = new_job_id()
    await backend.submit_job(launch_for(job_id), job_spec())
    log = "".join(f"line {n}\n" for n in range(10)) + "Traceback: ValueError\n"
    await _finish_after_running(cluster, job_id, exit_code=2, log=log)
    seen = await reports_until(backend, lambda s: s[-1].state == "failed")
    last = seen[-1]
    assert (last.state, last.exit_code) == ("failed", 2)
    assert last.log_tail == "line 6\nline 7\nline 8\nline 9\nTraceback: ValueError"


async def test_a_run_past_its_deadline_reports_timed_out(backend, cluster):
    job_id = new_job_id()
    await backend.submit_job(launch_for(job_id), job_spec())
    await _finish_after_running(cluster, job_id, expire=True, log="working...\n")
    seen = await reports_until(backend, lambda s: s[-1].state == "timed_out")
    assert (seen[-1].exit_code, seen[-1].log_tail) == (143, "working...")


async def test_cancel_deletes_the_job_in_the_background(backend, server, cluster):
    job_id = new_job_id()
    await backend.submit_job(launch_for(job_id), job_spec())
    await wait_for(lambda: cluster.running_pods(job_id) == 1, what="the job's pod")
    await backend.cancel_job(job_id)
    await backend.cancel_job(job_id)

    assert server.objects_of(JOBS) == server.objects_of(SECRETS) == {}
    deletes = [r for r in server if r.action == kmock.action.DELETE]
    delete = next(r for r in deletes if r.resource == kubesim.ref(JOBS))
    assert delete.name == job_id
    assert delete.data["propagationPolicy"] == "Background"
    await wait_for(lambda: not server.objects_of(PODS), what="the pod to be collected")
    assert await backend.list_instances() == []


async def test_watch_jobs_stops_even_when_the_api_does_not_answer(backend, server):
    server.fail("list", JOBS, 503, times=1000)
    stopping = asyncio.Event()
    watching = asyncio.create_task(backend.watch_jobs(lambda update: None, stopping))
    await wait_for(lambda: backend.api.calls[("list", "batch", "jobs")] >= 2, what="a retry")
    stopping.set()
    await asyncio.wait_for(watching, WAIT_S)


# -- RBAC --


def role_rules() -> set[tuple[str, str, str]]:
    docs = yaml.safe_load_all((ROOT / "k8s/base/rbac.yaml").read_text())
    role = next(d for d in docs if d and d["kind"] == "Role")
    assert role["metadata"]["namespace"] == "spinyard-apps"
    return {
        (verb, group, resource)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


async def test_every_call_is_allowed_by_the_role(make, server, cluster):
    backends = [await make(route_kind="ingressroute"), await make(route_kind="ingress")]
    for backend in backends:
        ok, crash, warm = new_id(), new_id(), new_id()
        await backend.start_viz(ok, k8s_spec())
        await backend.start_viz(crash, sim_spec("crash:1"))
        await backend.start_viz(warm, k8s_spec(), pooled=True)
        await backend.wait_ready(ok, k8s_spec(), WAIT_S)
        with pytest.raises(StartFailed):
            await backend.wait_ready(crash, sim_spec("crash:1"), WAIT_S)
        await backend.claim(warm)
        await backend.list_instances()
        runner, spec = new_id(), model_spec(image=IMAGE, pool={"size": 1})
        await backend.start_warm(runner, spec, WAIT_S)
        assert await backend.claim(runner)
        assert await backend.submit_warm(launch_for(new_job_id()), spec, runner)
        done, failed = new_job_id(), new_job_id()
        await backend.submit_job(launch_for(done), job_spec())
        await backend.submit_job(launch_for(failed), job_spec())
        await backend.submit_job(launch_for(failed), job_spec())  # 409: reads it
        await _finish_after_running(cluster, done)
        await _finish_after_running(cluster, failed, exit_code=1)
        await reports_until(backend, lambda s: {u.state for u in s} >= {"succeeded", "failed"})
        for instance in await backend.list_instances():
            if instance.kind == "viz":
                await backend.stop_viz(instance.id)
            else:
                await backend.cancel_job(instance.id)

    calls = set().union(*(b.api.calls for b in backends))
    allowed = role_rules()
    assert {c for c in calls if c not in allowed} == set()
    # what the run above exercised: every rule of the Role is used
    assert {(g, r) for _, g, r in calls} == {(g, r) for _, g, r in allowed}


# -- configuration --


def test_make_backend_builds_it_without_touching_a_cluster(tmp_path):
    settings = Settings(data_dir=tmp_path)
    settings.backend.kind = "kubernetes"
    settings.gateway.public_url = "https://gw.example.org"
    backend = make_backend(settings)
    assert isinstance(backend, KubernetesBackend) and backend.name == "kubernetes"
    assert backend.url("i-0123456789abcdef", k8s_spec()) == (
        "https://gw.example.org/apps/test/echo/i-0123456789abcdef/"
    )
    settings.backend.kubernetes.public_base_url = "https://{title}.apps.example.org"
    assert (
        make_backend(settings)
        .url("i-0123456789abcdef", k8s_spec())
        .startswith("https://echo.apps.example.org/apps/")
    )


async def test_setup_loads_a_kubeconfig(server, tmp_path, k8s_settings):
    kubeconfig = write_kubeconfig(
        tmp_path / "config", str(server.url), "spinyard", context="test", current="other"
    )
    settings = k8s_settings.model_copy(update={"kubeconfig": kubeconfig, "context": "test"})
    backend = KubernetesBackend(settings, PUBLIC_URL)
    await backend.setup()
    try:
        assert await backend.list_instances() == []
    finally:
        await backend.cleanup()
    sent = next(r for r in server if r.action == kmock.action.LIST)
    assert sent.headers["Authorization"] == "Bearer t0ken"


def test_in_a_pod_the_service_account_is_used(tmp_path, monkeypatch, k8s_settings):
    from kubernetes.config import incluster_config

    token, cert = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("sa-token")
    cert.write_text("not checked until a request")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(cert))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    cfg = clientconfig.load_configuration(k8s_settings.model_copy(update={"context": "ignored"}))
    assert cfg.host == "https://10.96.0.1:443"
    assert cfg.get_api_key_with_prefix("BearerToken").lower() == "bearer sa-token"


async def test_missing_templates_fall_back_to_the_builtin_ones(make, server, tmp_path):
    backend = await make(pod_templates_dir=tmp_path / "none")
    assert backend._templates == objects.DEFAULT_TEMPLATES


# -- the bench script --


def test_the_k8s_sim_bench_runs(tmp_path):
    out = tmp_path / "sim.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.k8s_sim", "--deployments", "6", "--jobs", "3",
         "--passes", "2", "--pool", "3", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["deployments"] == 6 and report["jobs"] == 3
    assert report["list_instances"]["found"] == 9
    assert "p50_ms" in report["list_instances"] and "calls_per_object" in report["cleanup"]
    warm = report["warm"]
    assert warm["refill"]["pool"] == 3 and warm["refill"]["wall_s"] > 0
    assert warm["hot_path"]["creates_per_run"] == 0  # a warm run's start creates nothing
    assert warm["hot_path"]["calls_per_run"] == {"patch core/pods": 1.0}
