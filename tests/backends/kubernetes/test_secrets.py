"""Secrets on the Kubernetes backend, against the API emulator and its simulated kubelet:
the store's Secret per app (and the gateway's exact Role), pods that read the values through
secretKeyRef (so no Deployment or Job holds one), and starts that fail `missing_secret`."""

import base64
import json

import pytest
import yaml
from structlog.testing import capture_logs

import kubesim
from dispatcher.backends.base import JobLaunch
from dispatcher.backends.kubernetes import objects
from dispatcher.backends.kubernetes.resources import DEPLOYMENTS, JOBS, PODS, SECRETS
from dispatcher.backends.kubernetes.secrets import SecretObjects
from handlers.errors import StartFailed
from schemas import errors as codes
from tests.backends.contract import new_id, new_job_id
from tests.backends.kubernetes.support import WAIT_S, job_spec, k8s_spec, write_kubeconfig
from tests.helpers import ROOT, run_cli, wait_for

APP = "alice/echo"
VALUE = "pg://alice:" + "Zq7-" * 6 + "@db/app"
SECRET_NAME = "spinyard-secrets-alice.echo"


@pytest.fixture
async def store(server, k8s_settings):
    """The gateway's store: an API client of its own."""
    made = SecretObjects.connecting(k8s_settings, kubesim.configuration(server))
    await made.setup()
    yield made
    await made.close()


def gateway_role() -> set[tuple[str, str, str]]:
    docs = yaml.safe_load_all((ROOT / "k8s/base/rbac.yaml").read_text())
    role = next(d for d in docs if d and d["metadata"]["name"] == "spinyard-gateway-secrets")
    assert role["kind"] == "Role" and role["metadata"]["namespace"] == "spinyard-apps"
    return {
        (verb, group, resource)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def decoded(secret: dict) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


async def test_the_store_keeps_a_labelled_secret_per_app_within_the_gateways_role(server, store):
    assert await store.names(APP) == []
    assert await store.put(APP, "APP_DB_URL", VALUE) is True
    assert await store.put(APP, "APP_DB_URL", "v2") is False
    assert await store.put(APP, "APP_TOKEN", "t") is True
    assert await store.put("bob/echo", "APP_DB_URL", "bob's") is True
    assert await store.names(APP) == ["APP_DB_URL", "APP_TOKEN"]
    secret = server.objects_of(SECRETS)[SECRET_NAME]
    assert decoded(secret) == {"APP_DB_URL": "v2", "APP_TOKEN": "t"}
    assert secret["type"] == "Opaque" and "stringData" not in secret
    assert secret["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "spinyard",
        "app.kubernetes.io/component": "secrets",
        "spinyard.io/app": "alice.echo",
    }
    assert secret["metadata"]["annotations"] == {"spinyard.io/app-name": APP}
    assert await store.remove(APP, "APP_DB_URL") is True
    assert await store.remove(APP, "APP_DB_URL") is False
    assert await store.names(APP) == ["APP_TOKEN"]
    assert decoded(server.objects_of(SECRETS)["spinyard-secrets-bob.echo"]) == {
        "APP_DB_URL": "bob's"
    }
    # Exactly the gateway Role's verbs, every one of them used.
    assert (
        set(store.api.calls)
        == gateway_role()
        == {
            ("get", "", "secrets"),
            ("create", "", "secrets"),
            ("patch", "", "secrets"),
        }
    )


async def test_a_viz_pod_reads_the_secret_from_the_apps_secret(backend, store, server, cluster):
    spec = k8s_spec(name=APP, secrets=["APP_DB_URL"])
    await store.put(APP, "APP_DB_URL", VALUE)
    await store.put(APP, "APP_UNNAMED", "not asked for")
    iid = new_id()
    with capture_logs() as logs:
        await backend.start_viz(iid, spec)
        await backend.wait_ready(iid, spec, WAIT_S)
    deployment = server.objects_of(DEPLOYMENTS)[iid]
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "APP_DB_URL", "valueFrom": {"secretKeyRef": {
        "name": SECRET_NAME, "key": "APP_DB_URL"}}} in env  # fmt: skip
    assert VALUE not in json.dumps(deployment) and "APP_UNNAMED" not in json.dumps(deployment)
    [pod] = [p for p in server.objects_of(PODS) if p.startswith(iid)]
    assert cluster.envs[pod]["APP_DB_URL"] == VALUE  # what the kubelet gave the app
    assert "APP_UNNAMED" not in cluster.envs[pod]
    assert VALUE not in repr(logs)
    assert ("get", "", "secrets") in backend.api.calls  # the names, before the start


async def test_a_run_reads_the_secret_too(backend, store, server, cluster):
    spec = job_spec(name="alice/model", secrets=["JOB_TOKEN"])
    await store.put(spec.name, "JOB_TOKEN", VALUE)
    jid = new_job_id()
    await backend.submit_job(JobLaunch(jid, {"n": 1}, {}, 60.0), spec)
    job = server.objects_of(JOBS)[jid]
    assert VALUE not in json.dumps(job)
    await wait_for(lambda: cluster.job_pod(jid) in cluster.envs, what="the run's pod")
    assert cluster.envs[cluster.job_pod(jid)]["JOB_TOKEN"] == VALUE


async def test_a_secret_that_is_not_set_fails_the_start_before_any_object(backend, store, server):
    await store.put(APP, "APP_DB_URL", VALUE)
    spec = k8s_spec(name=APP, secrets=["APP_DB_URL", "APP_MISSING"])
    with pytest.raises(StartFailed) as failed:
        await backend.start_viz(new_id(), spec)
    assert failed.value.code == codes.MISSING_SECRET
    assert "APP_MISSING" in failed.value.message and VALUE not in failed.value.message
    nothing = job_spec(name="bob/model", secrets=["JOB_TOKEN"])  # bob has no Secret at all
    with pytest.raises(StartFailed) as failed:
        await backend.submit_job(JobLaunch(new_job_id(), {}, {}, 60.0), nothing)
    assert failed.value.code == codes.MISSING_SECRET and "JOB_TOKEN" in failed.value.message
    assert server.objects_of(DEPLOYMENTS) == server.objects_of(JOBS) == {}


async def test_the_simulated_kubelet_holds_a_pod_whose_secret_is_missing(backend, server, cluster):
    """As a real kubelet: a secretKeyRef to a missing key keeps the container waiting."""
    spec, iid = k8s_spec(name=APP, secrets=["APP_GONE"]), new_id()
    deployment = objects.make_viz_deployment(
        spec, iid, template=objects.DEFAULT_TEMPLATES["viz"], created_at=0
    )
    await backend.api.create(DEPLOYMENTS, deployment)  # past the backend's own check

    def waiting() -> dict | None:
        pods = [p for n, p in server.objects_of(PODS).items() if n.startswith(iid)]
        statuses = pods[0].get("status", {}).get("containerStatuses") if pods else None
        return statuses[0]["state"].get("waiting") if statuses else None

    state = await wait_for(waiting, what="the pod's waiting state")
    assert state == {
        "reason": "CreateContainerConfigError",
        "message": f'secret "{SECRET_NAME}" not found',
    }


async def test_the_cli_without_a_gateway_writes_the_apps_secret_through_a_kubeconfig(
    server, tmp_path
):
    """`spinyard secrets` on the Kubernetes backend, as an operator runs it: the real CLI."""
    kubeconfig = write_kubeconfig(tmp_path / "config", str(server.url), "op")
    env = {
        "SPINYARD_BACKEND__KIND": "kubernetes",
        "SPINYARD_BACKEND__KUBERNETES__KUBECONFIG": str(kubeconfig),
        "SPINYARD_BACKEND__KUBERNETES__API_TRIES": "1",
    }
    got = await spinyard("secrets", "set", APP, "APP_DB_URL", stdin=VALUE, **env)
    assert got == (0, f"set {APP} APP_DB_URL (new)\n", "")
    assert decoded(server.objects_of(SECRETS)[SECRET_NAME]) == {"APP_DB_URL": VALUE}
    assert await spinyard("secrets", "list", APP, **env) == (0, "APP_DB_URL\n", "")
    assert (await spinyard("secrets", "rm", APP, "APP_DB_URL", **env))[0] == 0
    assert decoded(server.objects_of(SECRETS)[SECRET_NAME]) == {}

    server.fail("get", SECRETS, 403, message="secrets is forbidden")
    code, _, err = await spinyard("secrets", "list", APP, **env)
    assert code == 1 and err.startswith("error: forbidden: ") and "Traceback" not in err


async def spinyard(*args: str, stdin: str = "", **env: str) -> tuple[int, str, str]:
    """The CLI's answer, after checking the value is never in what it prints."""
    code, out, err = await run_cli(*args, stdin=stdin, **env)
    assert VALUE not in out + err
    return code, out, err


def test_a_secret_replaces_a_template_variable_of_its_name_in_place():
    template = {
        "spec": {"containers": [{"name": "job", "env": [{"name": "APP_DB_URL", "value": "x"}]}]}
    }
    spec = job_spec(name=APP, secrets=["APP_DB_URL"], env={"APP_PLAIN": "p"})
    job = objects.make_job(JobLaunch(new_job_id(), {}, {}, 60.0), spec, template=template,
                           created_at=0)  # fmt: skip
    env = job.spec.template.spec.containers[0].env
    assert env[0].name == "APP_DB_URL" and env[0].value is None
    assert env[0].value_from.secret_key_ref.to_dict() == {
        "name": SECRET_NAME,
        "key": "APP_DB_URL",
        "optional": None,
    }
    assert {e.name: e.value for e in env[1:]}["APP_PLAIN"] == "p"
