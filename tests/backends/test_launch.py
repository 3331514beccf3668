"""The launch contract, once for every backend: placeholders, environments and id checks."""

import json
import subprocess
import sys

import pytest
from kubernetes import client
from pydantic import ValidationError

from dispatcher.backends import launch
from dispatcher.backends.base import JobLaunch
from dispatcher.backends.kubernetes import objects
from dispatcher.backends.kubernetes.pods import DEFAULT_TEMPLATES
from schemas.spec import PLACEHOLDERS, AppSpec
from tests.helpers import ROOT

IID, JID = "i-0123456789abcdef", "j-0123456789abcdef"
PREFIX = f"/apps/alice/demo/{IID}/"
VIZ = launch.viz_values(port=8050, prefix=PREFIX, host="127.0.0.1", python="/usr/bin/python3")
JOB = launch.job_values(python="/usr/bin/python3")


def viz_spec(**fields) -> AppSpec:
    values = {
        "name": "alice/demo",
        "command": ["{python}", "app.py", "--bind={host}:{port}", "--prefix", "{prefix}", "{x}"],
        "env": {"WHERE": "{host}:{port}{prefix}", "PLAIN": "{x}", "JSON": '{"a": 1}'},
    }
    return AppSpec(**(values | fields))


def job_spec(**fields) -> AppSpec:
    values = {
        "name": "alice/model",
        "kind": "job",
        "command": ["{python}", "-m", "model", "--seed={seed}"],
        "env": {"RUNTIME": "{python}", "MODE": "fast"},
    }
    return AppSpec(**(values | fields))


def job_env(spec: AppSpec, deadline_s: float = 120.5) -> dict[str, str]:
    paths = {"inputs": "/run/in.json", "uploads": "/run/up.json", "output_dir": "/out"}
    return launch.job_env(spec, JID, JOB, **paths, deadline_s=deadline_s)


# -- placeholders --


@pytest.mark.parametrize(("kind", "values"), [("viz", VIZ), ("job", JOB)])
def test_each_kind_has_a_value_for_every_placeholder_its_specs_may_use(kind, values):
    assert set(values) == PLACEHOLDERS[kind]


def test_known_placeholders_are_filled_and_other_braces_left_as_written():
    assert launch.argv(viz_spec(), VIZ) == [
        "/usr/bin/python3",
        "app.py",
        "--bind=127.0.0.1:8050",
        "--prefix",
        PREFIX,
        "{x}",
    ]
    assert launch.fill('{"port": {port}} {{port}} {port', VIZ) == '{"port": 8050} {8050} {port'


def test_a_placeholder_with_no_value_is_left_alone_not_an_error():
    # The old local backend raised KeyError here, and the run request was retried and
    # dead-lettered. Validation now stops such a spec (below); should one get past it
    # (a spec stored before, or built without validation), it still cannot crash.
    unchecked = job_spec().model_copy(update={"command": ["{python}", "--port={port}"]})
    assert launch.argv(unchecked, JOB) == ["/usr/bin/python3", "--port={port}"]
    assert launch.fill("{prefix}{host}", JOB) == "{prefix}{host}"


@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"command": ["run", "--port={port}"]}, "command[1]: {port}"),
        ({"command": ["run", "{prefix}"]}, "command[1]: {prefix}"),
        ({"env": {"BIND": "{host}"}}, "env['BIND']: {host}"),
    ],
)
def test_a_job_spec_with_a_viz_placeholder_is_refused_at_registration(change, where):
    with pytest.raises(ValidationError) as err:
        job_spec(**change)
    assert where in str(err.value)
    assert "has no value in a job app" in str(err.value)


def test_a_viz_spec_may_use_every_placeholder_and_a_job_spec_python():
    assert viz_spec().command[2] == "--bind={host}:{port}"  # accepted as written
    assert job_spec().env["RUNTIME"] == "{python}"


# -- environments --


def test_a_viz_instance_gets_the_spec_env_filled_then_spinyards_variables():
    env = launch.viz_env(viz_spec(env={"WHERE": "{host}:{port}", "SPINYARD_PORT": "1"}), IID, VIZ)
    assert list(env.items()) == [
        ("WHERE", "127.0.0.1:8050"),
        ("SPINYARD_PORT", "8050"),  # ours win over the spec's
        ("SPINYARD_PREFIX", PREFIX),
        ("SPINYARD_INSTANCE", IID),
        ("SPINYARD_APP", "alice/demo"),
    ]


def test_a_run_gets_the_spec_env_filled_then_spinyards_variables_with_its_app():
    assert job_env(job_spec()) == {
        "RUNTIME": "/usr/bin/python3",
        "MODE": "fast",
        "SPINYARD_JOB_ID": JID,
        "SPINYARD_APP": "alice/model",
        "SPINYARD_INPUTS": "/run/in.json",
        "SPINYARD_UPLOADS": "/run/up.json",
        "SPINYARD_OUTPUT_DIR": "/out",
        "SPINYARD_DEADLINE_S": "120.5",
    }
    assert job_env(job_spec(deadline_s=5), deadline_s=30.0)["SPINYARD_DEADLINE_S"] == "30"


def test_kubernetes_containers_get_the_contracts_command_and_environment():
    """The local backend's side is checked end to end in tests/backends/local."""
    spec = viz_spec(image="registry.example.com/alice/demo:1", port=8050)
    deployment = objects.make_viz_deployment(
        spec, IID, template=DEFAULT_TEMPLATES["viz"], created_at=0.0
    )
    container = deployment.spec.template.spec.containers[0]
    values = launch.viz_values(port=8050, prefix=PREFIX, host="0.0.0.0", python="python")
    assert container.command == launch.argv(spec, values)
    assert _env(container) == {"HOME": "/tmp"} | launch.viz_env(spec, IID, values)

    spec = job_spec(image="registry.example.com/alice/model:3")
    run = JobLaunch(job_id=JID, inputs={}, upload_urls={}, deadline_s=120.5)
    job = objects.make_job(run, spec, template=DEFAULT_TEMPLATES["job"], created_at=0.0)
    container = job.spec.template.spec.containers[0]
    values = launch.job_values(python="python")
    paths = {
        "inputs": "/var/run/spinyard/inputs.json",
        "uploads": "/var/run/spinyard/uploads.json",
        "output_dir": "/tmp/outputs",
    }
    assert container.command == launch.argv(spec, values)
    assert _env(container) == {"HOME": "/tmp"} | launch.job_env(
        spec, JID, values, **paths, deadline_s=120.5
    )


def _env(container: client.V1Container) -> dict[str, str]:
    return {e.name: e.value for e in container.env}


# -- ids --


@pytest.mark.parametrize("good", [IID, JID, "i-abcdefgh", "j-" + "a" * 40])
def test_instance_and_job_ids_are_accepted(good):
    assert launch.valid_id(good)
    assert launch.check_id(good) == good


@pytest.mark.parametrize(
    "bad", ["", "i-short", "i-ABCDEFGHIJ", "../i-0123456789", "i-0123456789/x", "x-0123456789"]
)
def test_anything_else_is_not_an_id(bad):
    assert not launch.valid_id(bad)
    with pytest.raises(ValueError, match="not an instance or job id"):
        launch.check_id(bad)


def test_a_job_id_check_refuses_instance_ids():
    assert launch.check_job_id(JID) == JID
    with pytest.raises(ValueError, match="not a job id"):
        launch.check_job_id(IID)


# -- what importing it costs --


def test_the_contract_and_the_job_runner_import_no_pydantic_nor_any_backend_library():
    """The job runner starts once per run: its imports are its start-up time."""
    heavy = ("pydantic", "yaml", "structlog", "aiohttp", "kubernetes", "handlers", "nats")
    code = (
        "import json, sys\n"
        "import dispatcher.backends.launch, dispatcher.backends.local.jobrunner\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == []


def test_a_probe_answer_is_worded_once_for_both_backends():
    """The local probe and kubelet's Events (Kubernetes) give the same words."""
    assert launch.status_answer(404) == "404 Not Found"
    assert launch.status_answer(404, "Nope") == "404 Nope"  # the app's own reason phrase
    assert launch.status_answer(599) == "599"  # no standard phrase
    assert launch.no_answer(2) == "no answer within 2 s"
    assert launch.not_ready_message(89.6, launch.last_answer("/healthz", "404 Not Found")) == (
        "the app did not become ready within 90 s: last answer to /healthz: 404 Not Found"
    )
