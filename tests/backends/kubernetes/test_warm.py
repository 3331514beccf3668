"""Warm runner pods on the Kubernetes backend: what only this backend does.

The shared warm-runner contract runs in test_backend.py. These check the
pod (no token, no credentials, its labels and probe), that a run's start
creates nothing, that a run really runs in the pod and uploads to the S3
server through its presigned URLs, the runner's answers to launches that
are not its own, and hand-overs and starts that fail. kubesim runs each
warm pod's command as a local process at a loopback pod IP (kubesim/processes.py).
"""

import json

import aiohttp
import pytest

import kubesim
from dispatcher.backends.kubernetes import objects
from dispatcher.backends.kubernetes import warm as warm_pods
from dispatcher.backends.kubernetes.resources import JOBS, PODS
from dispatcher.backends.kubernetes.secrets import SecretObjects
from dispatcher.store import ObjectStore
from handlers.errors import StartFailed
from schemas import errors as codes
from tests.backends.contract import JobWatch, find, launch, new_id, new_job_id
from tests.backends.contract import job_spec as contract_job_spec
from tests.backends.kubernetes.support import IMAGE, WAIT_S
from tests.helpers import wait_for
from tests.s3 import store_settings


def model_spec(*args: str, **fields):
    """The contract's job model in the test image, with a pool."""
    return contract_job_spec(*args, **({"image": IMAGE, "pool": {"size": 1}} | fields))


@pytest.fixture
async def watcher(backend):
    watch = JobWatch(backend)
    yield watch
    await watch.stop()


async def started(backend, spec) -> str:
    warm = new_id()
    await backend.start_warm(warm, spec, WAIT_S)
    return warm


def pod_of(server, name: str) -> dict:
    return server.objects_of(PODS)[objects.object_name(name)]


def model_saw(cluster, pod: str) -> dict:
    """What the job model printed about its run (`job_model: {...}`), from the pod's log."""
    for line in (cluster.node.log(pod) or "").splitlines():
        if line.startswith("job_model: {"):
            return json.loads(line.removeprefix("job_model: "))
    raise AssertionError(f"the model said nothing: {cluster.node.log(pod)!r}")


async def test_a_warm_pod_holds_no_token_and_no_credentials(backend, server, monkeypatch):
    monkeypatch.setenv("SPINYARD_STORE__SECRET_KEY", "must-not-leak")
    spec = model_spec(env={"JOB_X": "1"}, resources={"cpu": "250m", "memory": "128Mi"})
    warm = await started(backend, spec)
    pod = pod_of(server, warm)
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["restartPolicy"] == "Never"
    assert "activeDeadlineSeconds" not in pod["spec"]  # set with its run
    [container] = pod["spec"]["containers"]
    assert container["image"] == IMAGE
    assert container["command"][:2] == ["python", "-c"]
    assert container["command"][2] == warm_pods.PROGRAM
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["SPINYARD_RUNNER_HOST"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["SPINYARD_RUNNER_PORT"] == "8787" and len(env["SPINYARD_RUNNER_TOKEN"]) >= 32
    assert set(env) == {
        "HOME",
        "JOB_X",
        *(f"SPINYARD_RUNNER_{k}" for k in ("HOST", "PORT", "TOKEN")),
    }
    assert "must-not-leak" not in json.dumps(pod)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "launch"}
    assert container["resources"]["limits"] == {"cpu": "250m", "memory": "128Mi"}
    labels = pod["metadata"]["labels"]
    assert labels | {"spinyard.io/instance": "?"} == {
        "app.kubernetes.io/managed-by": "spinyard",
        "app.kubernetes.io/component": "job",
        "spinyard.io/app": "test.model",
        "spinyard.io/instance": "?",
        "spinyard.io/warm-runner": "true",
        "spinyard.io/pooled": "true",
    }


async def test_a_run_from_a_warm_pod_creates_nothing_and_uploads_to_s3(
    make, server, cluster, s3_server
):
    backend = await make()
    watcher = JobWatch(backend)  # its informers are the handler process's cache
    store = ObjectStore(store_settings(s3_server))
    await store.setup()
    try:
        names = ["summary.json"]
        spec = model_spec("--upload", outputs=names, deadline_s=30)
        warm = await started(backend, spec)
        jid, inputs = new_job_id(), {"n": 3, "text": "é ✓"}
        urls = store.upload_urls(jid, names)
        backend.api.calls.clear()
        assert await backend.claim(warm)
        assert await backend.submit_warm(launch(jid, spec, inputs, upload_urls=urls), spec, warm)
        hot_path = dict(backend.api.calls)
        assert hot_path == {("patch", "", "pods"): 1}  # no create, no get: one relabel
        pod = pod_of(server, warm)
        assert pod["metadata"]["labels"]["spinyard.io/instance"] == jid
        assert pod["metadata"]["labels"]["spinyard.io/pooled"] == "false"
        assert pod["spec"]["activeDeadlineSeconds"] >= 30

        await watcher.until(jid, "succeeded")
        name = pod["metadata"]["name"]
        # Its end reported, the pod goes (its log tail would be in a failure's report).
        await wait_for(lambda: name not in server.objects_of(PODS), what="the used pod deleted")
        seen = model_saw(cluster, name)
        assert seen["stdin"] == seen["inputs"] == inputs
        assert seen["uploads"] == urls
        assert seen["env"]["SPINYARD_JOB_ID"] == jid
        assert seen["env"]["SPINYARD_DEADLINE_S"] == "30"
        assert not [k for k in seen["env"] if k.startswith("SPINYARD_RUNNER_")]
        [result] = await store.collect(jid, names)
        async with aiohttp.ClientSession() as http, http.get(result.url) as resp:
            assert await resp.text() == f"summary.json of {jid}"
        assert await find(backend, jid) is None
        assert await find(backend, warm) is None
    finally:
        await watcher.stop()
        await store.close()


async def test_the_runner_takes_only_its_own_launch_once(backend, server, cluster, watcher):
    spec = model_spec("--sleep", "600")
    warm = await started(backend, spec)
    pod = pod_of(server, warm)
    url = f"http://{pod['status']['podIP']}:8787"
    token = next(
        e["value"] for e in pod["spec"]["containers"][0]["env"] if e["name"].endswith("TOKEN")
    )
    jid = new_job_id()
    body = objects.warm_launch(launch(jid, spec), spec)
    mine = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/healthz") as resp:
            assert resp.status == 200
        async with http.post(f"{url}/launch", json=body) as resp:
            assert resp.status == 403
        async with http.post(
            f"{url}/launch", json=body, headers={"Authorization": "Bearer x"}
        ) as resp:
            assert resp.status == 403
        async with http.post(f"{url}/launch", json={"job_id": jid}, headers=mine) as resp:
            assert resp.status == 400
        async with http.post(f"{url}/launch", data=b"not json", headers=mine) as resp:
            assert resp.status == 400
        assert cluster.node.running(pod["metadata"]["name"])  # still waiting
        assert await backend.claim(warm)
        assert await backend.submit_warm(launch(jid, spec), spec, warm)
        async with http.post(f"{url}/launch", json=body, headers=mine) as resp:
            assert resp.status == 200  # the same run again: a lost answer, nothing new
        other = objects.warm_launch(launch(new_job_id(), spec), spec)
        async with http.post(f"{url}/launch", json=other, headers=mine) as resp:
            assert resp.status == 409
        async with http.get(f"{url}/healthz") as resp:
            assert resp.status == 503
    await watcher.until(jid, "running")
    await backend.cancel_job(jid)
    await watcher.until(jid, "cancelled")
    assert cluster.running_pods(jid) == 0


async def test_a_launch_the_pod_cannot_run_gives_it_back_for_a_cold_start(backend, server, watcher):
    spec = model_spec().model_copy(update={"command": ["/no/such/model"]})
    warm = await started(backend, spec)
    jid = new_job_id()
    assert await backend.claim(warm)
    assert not await backend.submit_warm(launch(jid, spec), spec, warm)
    assert objects.object_name(warm) not in server.objects_of(PODS)  # deleted
    assert await find(backend, jid) is None and await find(backend, warm) is None
    assert "cancelled" not in watcher.states(jid)  # the cold start is the run


async def test_a_pod_of_another_image_is_not_handed_the_run(backend, server):
    spec = model_spec()
    warm = await started(backend, spec)
    newer = spec.model_copy(update={"image": IMAGE + "-new"})
    assert not await backend.submit_warm(launch(new_job_id(), newer), newer, warm)
    assert objects.object_name(warm) not in server.objects_of(PODS)


async def test_a_runner_that_cannot_start_fails_with_its_log(backend, server):
    spec = model_spec(env={"PYTHONHOME": "/nonexistent"})  # the image's python cannot run
    with pytest.raises(StartFailed) as err:
        await backend.start_warm(new_id(), spec, WAIT_S)
    assert err.value.code == codes.START_FAILED
    assert "exited at start" in err.value.message
    assert err.value.log_tail


async def test_a_runner_not_ready_in_time_times_out(backend, server):
    warm = new_id()
    with pytest.raises(StartFailed) as err:
        await backend.start_warm(warm, model_spec(), 0.01)  # a Python starts in more
    assert err.value.code == codes.START_TIMEOUT
    assert "not ready within 1 s" in err.value.message
    await backend.stop_viz(warm)
    await wait_for(lambda: objects.object_name(warm) not in server.objects_of(PODS))


async def test_a_stopped_warm_pod_is_gone_and_its_process_too(backend, server, cluster):
    warm = await started(backend, model_spec())
    name = objects.object_name(warm)
    assert cluster.node.running(name)
    await backend.stop_viz(warm)
    assert name not in server.objects_of(PODS)
    await wait_for(lambda: not cluster.node.running(name), what="the runner to stop")


def _pod(labels: dict, phase: str = "Running", **status) -> dict:
    base = {"app.kubernetes.io/component": "job", "spinyard.io/warm-runner": "true"}
    return {
        "metadata": {
            "name": "p",
            "labels": base | labels,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "status": {"phase": phase, **status},
    }


@pytest.mark.parametrize(
    ("phase", "status", "state"),
    [
        ("Pending", {}, None),
        ("Running", {}, "running"),
        ("Succeeded", {}, "succeeded"),
        ("Failed", {}, "failed"),
        ("Failed", {"reason": "DeadlineExceeded"}, "timed_out"),
    ],
)
def test_a_warm_pods_phase_is_its_runs_state(phase, status, state):
    assert warm_pods.run_state(_pod({}, phase, **status)) == state


def test_a_warm_pod_is_listed_as_a_runner_until_it_has_a_run():
    waiting = warm_pods.instance_of(
        _pod({"spinyard.io/instance": "i-1", "spinyard.io/pooled": "true"})
    )
    assert (waiting.id, waiting.kind, waiting.pooled, waiting.alive) == ("i-1", "warm", True, True)
    jid = new_job_id()
    ran = _pod({"spinyard.io/instance": jid, "spinyard.io/pooled": "false"}, "Succeeded")
    listed = warm_pods.instance_of(ran)
    assert (listed.id, listed.kind, listed.alive) == (jid, "job", False)
    assert not warm_pods.waiting(ran)
    assert warm_pods.instance_of({"metadata": {"labels": {}}}) is None


async def test_a_failing_warm_run_reports_its_exit_code_and_log_tail(backend, watcher):
    spec = model_spec("--exit", "3")
    warm, jid = await started(backend, spec), new_job_id()
    assert await backend.claim(warm)
    assert await backend.submit_warm(launch(jid, spec), spec, warm)
    failed = await watcher.until(jid, "failed")
    assert failed.exit_code == 3
    assert "job_model: failing with 3" in failed.log_tail
    assert watcher.states(jid) in (["running", "failed"], ["failed"])


async def test_a_cold_start_of_a_run_a_warm_pod_has_starts_nothing(make, server, cluster):
    first, again = await make(), await make()  # run_start, then its redelivery elsewhere
    spec = model_spec("--sleep", "600")
    warm, jid = await started(first, spec), new_job_id()
    assert await first.claim(warm)
    assert await first.submit_warm(launch(jid, spec), spec, warm)
    await again.submit_job(launch(jid, spec), spec)
    assert server.objects_of(JOBS) == {}
    assert cluster.running_pods(jid) == 1
    await again.cancel_job(jid)
    await wait_for(lambda: cluster.running_pods(jid) == 0, what="the warm run stopped")


async def test_a_start_stopped_between_relabel_and_launch_runs_on_its_redelivery(
    make, server, cluster, watcher
):
    first, again = await make(), await make()
    spec = model_spec()
    warm, jid = await started(first, spec), new_job_id()
    assert await first.claim(warm)
    # What `hand` does before the launch, and then its replica dies: the pod is the run's.
    relabel = {"metadata": {"labels": {"spinyard.io/instance": jid, "spinyard.io/pooled": "false"}}}
    await first.api.patch(PODS, objects.object_name(warm), relabel)
    await again.submit_job(launch(jid, spec), spec)  # the redelivered start
    await watcher.until(jid, "succeeded")
    assert server.objects_of(JOBS) == {}  # launched on the warm pod, not started cold


@pytest.fixture
async def secret_store(server, k8s_settings):
    """The gateway's store of app secrets: an API client of its own."""
    made = SecretObjects.connecting(k8s_settings, kubesim.configuration(server))
    await made.setup()
    yield made
    await made.close()


async def test_a_warm_run_gets_the_apps_secrets_and_the_pod_holds_no_value(
    backend, server, cluster, watcher, secret_store
):
    value = "tok-" + "Zq7-" * 6
    spec = model_spec(secrets=["JOB_TOKEN"])
    await secret_store.put(spec.name, "JOB_TOKEN", value)
    warm, jid = await started(backend, spec), new_job_id()
    pod = pod_of(server, warm)
    assert value not in json.dumps(pod)
    assert await backend.claim(warm)
    assert await backend.submit_warm(launch(jid, spec), spec, warm)
    await watcher.until(jid, "succeeded")
    assert model_saw(cluster, pod["metadata"]["name"])["env"]["JOB_TOKEN"] == value

    missing = model_spec(name="bob/model", secrets=["JOB_TOKEN"])  # bob has no Secret
    with pytest.raises(StartFailed) as failed:
        await backend.start_warm(new_id(), missing, WAIT_S)
    assert failed.value.code == codes.MISSING_SECRET
    assert [p for p in server.objects_of(PODS).values() if "bob.model" in json.dumps(p)] == []
