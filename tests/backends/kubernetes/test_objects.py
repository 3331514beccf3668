"""The Kubernetes objects spinyard builds, and the slug function that names them.

Pure functions, so no API: each builder's output is compared with the dict a
reviewer expects (serialised by the official client, as it is sent), then
validated strictly against the Kubernetes 1.30 OpenAPI schemas.
"""

import re

import kubernetes_validate
import pytest
import yaml
from kubernetes import client

from dispatcher.backends.base import JobLaunch
from dispatcher.backends.kubernetes import objects
from dispatcher.backends.kubernetes.slugs import slug
from schemas.spec import AppSpec
from tests.helpers import ROOT

TEMPLATES = ROOT / "k8s/base/pod-templates"
K8S_VERSION = "1.30"
IID, JID = "i-0123456789abcdef", "j-00112233445566778899aabb"
CREATED, CREATED_TEXT = 1_700_000_000.25, "2023-11-14T22:13:20.250000Z"
PREFIX = f"/apps/alice/demo/{IID}/"
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
OWNER = client.V1OwnerReference(
    api_version="apps/v1", kind="Deployment", name=IID, uid="uid-1", block_owner_deletion=False
)

serialize = client.ApiClient().sanitize_for_serialization


def template(component: str) -> dict:
    return yaml.safe_load((TEMPLATES / f"{component}.yaml").read_text())


def viz_spec(**fields) -> AppSpec:
    values = {
        "name": "alice/demo",
        "image": "registry.example.com/alice/demo:1.2",
        "port": 8050,
        "command": ["{python}", "app.py", "--port", "{port}", "--prefix={prefix}", "{other}"],
        "env": {"BIND": "{host}:{port}", "PLAIN": "{x}"},
        "resources": {"cpu": "250m", "memory": "300Mi"},
        "readiness_path": "/health",
        "entry_path": "main",
        "start_timeout_s": 45.5,
    }
    return AppSpec(**(values | fields))


def job_spec(**fields) -> AppSpec:
    values = {
        "name": "alice/model",
        "kind": "job",
        "image": "registry.example.com/alice/model:3",
        "command": ["{python}", "-m", "model", "--seed={seed}"],  # a job has no {port}
        "env": {"MODE": "fast", "RUNTIME": "{python}"},
        "deadline_s": 120.5,
        "outputs": ["result.csv"],
    }
    return AppSpec(**(values | fields))


def validate(obj) -> dict:
    data = serialize(obj)
    kubernetes_validate.validate(data, K8S_VERSION, strict=True)
    return data


META = {
    "annotations": {"spinyard.io/app-name": "alice/demo", "spinyard.io/created-at": CREATED_TEXT},
    "labels": {
        "app.kubernetes.io/managed-by": "spinyard",
        "app.kubernetes.io/component": "viz",
        "spinyard.io/app": "alice.demo",
        "spinyard.io/instance": IID,
    },
    "name": IID,
}
SECURE_POD = {
    "automountServiceAccountToken": False,
    "enableServiceLinks": False,
    "securityContext": {
        "fsGroup": 10001,
        "runAsGroup": 10001,
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    },
}
SECURE_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
}


def test_the_builtin_templates_are_the_shipped_ones():
    assert objects.DEFAULT_TEMPLATES["viz"] == template("viz")
    assert objects.DEFAULT_TEMPLATES["job"] == template("job")


def test_viz_deployment():
    deployment = objects.make_viz_deployment(
        viz_spec(),
        IID,
        template=template("viz"),
        created_at=CREATED,
        pooled=True,
        image_pull_policy="IfNotPresent",
    )
    assert isinstance(deployment, client.V1Deployment)
    pod_labels = META["labels"]
    assert validate(deployment) == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": META | {"labels": pod_labels | {"spinyard.io/pooled": "true"}},
        "spec": {
            "replicas": 1,
            "selector": {
                "matchLabels": {
                    "app.kubernetes.io/managed-by": "spinyard",
                    "spinyard.io/instance": IID,
                }
            },
            "strategy": {"type": "Recreate"},
            "revisionHistoryLimit": 0,
            "progressDeadlineSeconds": 46,
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": SECURE_POD
                | {
                    "containers": [
                        {
                            "name": "app",
                            "image": "registry.example.com/alice/demo:1.2",
                            "imagePullPolicy": "IfNotPresent",
                            "command": [
                                "python",
                                "app.py",
                                "--port",
                                "8050",
                                f"--prefix={PREFIX}",
                                "{other}",
                            ],
                            "env": [
                                {"name": "HOME", "value": "/tmp"},
                                {"name": "BIND", "value": "0.0.0.0:8050"},
                                {"name": "PLAIN", "value": "{x}"},
                                {"name": "SPINYARD_PORT", "value": "8050"},
                                {"name": "SPINYARD_PREFIX", "value": PREFIX},
                                {"name": "SPINYARD_INSTANCE", "value": IID},
                                {"name": "SPINYARD_APP", "value": "alice/demo"},
                            ],
                            "ports": [{"name": "http", "containerPort": 8050}],
                            "resources": {
                                "requests": {"cpu": "250m", "memory": "300Mi"},
                                "limits": {"cpu": "250m", "memory": "300Mi"},
                            },
                            "readinessProbe": {
                                "httpGet": {"path": PREFIX.rstrip("/") + "/health", "port": "http"},
                                "periodSeconds": 1,
                                "timeoutSeconds": 2,
                                "failureThreshold": 3,
                            },
                            "securityContext": SECURE_CONTAINER,
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                        }
                    ],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
                },
            },
        },
    }


def test_viz_deployment_needs_an_image():
    with pytest.raises(ValueError, match="needs `image`"):
        objects.make_viz_deployment(
            viz_spec(image=None), IID, template=template("viz"), created_at=CREATED
        )


def test_a_loose_template_cannot_weaken_the_pod():
    loose = {
        "metadata": {"labels": {"team": "data"}},
        "spec": {
            "automountServiceAccountToken": True,
            "hostNetwork": True,
            "nodeSelector": {"pool": "apps"},
            "securityContext": {"runAsUser": 0, "runAsNonRoot": False},
            "containers": [
                {
                    "name": "app",
                    "env": [
                        {"name": "SPINYARD_PORT", "value": "1"},
                        {"name": "TZ", "value": "UTC"},
                    ],
                    "securityContext": {
                        "privileged": True,
                        "readOnlyRootFilesystem": False,
                        "capabilities": {"add": ["NET_ADMIN"]},
                    },
                },
                {"name": "sidecar", "image": "busybox"},
            ],
        },
    }
    data = validate(
        objects.make_viz_deployment(viz_spec(), IID, template=loose, created_at=CREATED)
    )
    pod = data["spec"]["template"]
    assert pod["metadata"]["labels"]["team"] == "data"  # additions are kept
    assert pod["spec"]["nodeSelector"] == {"pool": "apps"}
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert "hostNetwork" not in pod["spec"]
    assert pod["spec"]["securityContext"] == {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    app, sidecar = pod["spec"]["containers"]
    assert app["securityContext"] == SECURE_CONTAINER
    assert app["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["spec"]["volumes"] == [{"name": "tmp", "emptyDir": {}}]
    env = {e["name"]: e["value"] for e in app["env"]}
    assert env["SPINYARD_PORT"] == "8050" and env["TZ"] == "UTC"  # ours win, theirs stay
    assert sidecar == {"name": "sidecar", "image": "busybox"}


def test_service():
    service = objects.make_service(viz_spec(), IID, created_at=CREATED, owner=OWNER)
    assert validate(service) == {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": META
        | {
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": IID,
                    "uid": "uid-1",
                    "blockOwnerDeletion": False,
                }
            ]
        },
        "spec": {
            "type": "ClusterIP",
            "selector": {"app.kubernetes.io/managed-by": "spinyard", "spinyard.io/instance": IID},
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def test_ingress_for_the_prefix():
    routing = objects.Routing(kind="ingress", ingress_class="nginx")
    ingress = objects.make_route(viz_spec(), IID, routing=routing, created_at=CREATED)
    assert isinstance(ingress, client.V1Ingress)
    assert validate(ingress) == {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": META,
        "spec": {
            "ingressClassName": "nginx",
            "rules": [
                {
                    "http": {
                        "paths": [
                            {
                                "path": PREFIX,
                                "pathType": "Prefix",
                                "backend": {"service": {"name": IID, "port": {"number": 80}}},
                            }
                        ]
                    }
                }
            ],
        },
    }


def test_ingressroute_for_the_prefix_and_a_host_per_app():
    routing = objects.Routing(host="{title}-{owner}.apps.example.com")
    route = objects.make_route(viz_spec(), IID, routing=routing, created_at=CREATED, owner=OWNER)
    assert route == {
        "apiVersion": "traefik.io/v1alpha1",
        "kind": "IngressRoute",
        "metadata": META | {"ownerReferences": [serialize(OWNER)]},
        "spec": {
            "routes": [
                {
                    "kind": "Rule",
                    "match": f"Host(`demo-alice.apps.example.com`) && PathPrefix(`{PREFIX}`)",
                    "services": [{"name": IID, "port": 80}],
                }
            ]
        },
    }


@pytest.mark.parametrize(
    ("host", "base", "url"),
    [
        (None, "https://example.org/", f"https://example.org{PREFIX}main"),
        (
            "{title}-{owner}.apps.example.org",
            "https://{title}-{owner}.apps.example.org",
            f"https://demo-alice.apps.example.org{PREFIX}main",
        ),
        (
            "{instance}.example.org",
            "http://{instance}.example.org:8080/base/",
            f"http://{IID}.example.org:8080/base{PREFIX}main",
        ),
    ],
)
def test_public_url_and_host(host, base, url):
    routing = objects.Routing(host=host, public_base_url=base)
    assert objects.public_url(routing, viz_spec(), IID) == url
    found = objects.route_host(routing, viz_spec(), IID)
    assert found is None if host is None else url.split("//")[1].startswith(found)


def test_odd_app_names_make_valid_hosts_and_labels():
    spec = viz_spec(name=f"my_org/{'x' * 60}_")
    routing = objects.Routing(kind="ingress", host="{title}.{owner}.example.org")
    host = objects.route_host(routing, spec, IID)
    assert all(DNS_1123.match(part) and len(part) <= 63 for part in host.split("."))
    ingress = objects.make_ingress(spec, IID, routing=routing, created_at=CREATED)
    data = validate(ingress)
    assert LABEL_VALUE.match(data["metadata"]["labels"]["spinyard.io/app"])
    assert data["metadata"]["annotations"]["spinyard.io/app-name"] == spec.name


JOB_ENV = [
    {"name": "HOME", "value": "/tmp"},
    {"name": "MODE", "value": "fast"},
    {"name": "RUNTIME", "value": "python"},  # env is filled as the command is, on both backends
    {"name": "SPINYARD_JOB_ID", "value": JID},
    {"name": "SPINYARD_APP", "value": "alice/model"},
    {"name": "SPINYARD_INPUTS", "value": "/var/run/spinyard/inputs.json"},
    {"name": "SPINYARD_UPLOADS", "value": "/var/run/spinyard/uploads.json"},
    {"name": "SPINYARD_OUTPUT_DIR", "value": "/tmp/outputs"},
    {"name": "SPINYARD_DEADLINE_S", "value": "120.5"},
]
JOB_MOUNTS = [
    {"name": "tmp", "mountPath": "/tmp"},
    {"name": "spinyard-run", "mountPath": "/var/run/spinyard", "readOnly": True},
    {"name": "outputs", "mountPath": "/tmp/outputs"},
]


def test_job_and_its_secret():
    launch = JobLaunch(
        job_id=JID,
        inputs={"n": 3, "name": "x"},
        upload_urls={"result.csv": "http://minio.test/results/j/result.csv?X-Amz-Signature=s"},
        deadline_s=120.5,
    )
    job = objects.make_job(
        launch,
        job_spec(),
        template=template("job"),
        created_at=CREATED,
        backoff_limit=0,
        ttl_s=600,
    )
    labels = META["labels"] | {
        "app.kubernetes.io/component": "job",
        "spinyard.io/app": "alice.model",
        "spinyard.io/instance": JID,
    }
    meta = {
        "annotations": {
            "spinyard.io/app-name": "alice/model",
            "spinyard.io/created-at": CREATED_TEXT,
        },
        "labels": labels,
    }
    assert validate(job) == {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": meta | {"name": JID},
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": 121,
            "ttlSecondsAfterFinished": 600,
            "completions": 1,
            "parallelism": 1,
            "suspend": True,
            "template": {
                "metadata": {"labels": labels},
                "spec": SECURE_POD
                | {
                    "restartPolicy": "Never",
                    "containers": [
                        {
                            "name": "job",
                            "image": "registry.example.com/alice/model:3",
                            "command": ["python", "-m", "model", "--seed={seed}"],
                            "env": JOB_ENV,
                            "resources": {
                                "requests": {"cpu": "500m", "memory": "512Mi"},
                                "limits": {"cpu": "500m", "memory": "512Mi"},
                            },
                            "securityContext": SECURE_CONTAINER,
                            "volumeMounts": JOB_MOUNTS,
                        }
                    ],
                    "volumes": [
                        {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}},
                        {
                            "name": "spinyard-run",
                            "secret": {"secretName": f"{JID}-run", "defaultMode": 0o440},
                        },
                        {"name": "outputs", "emptyDir": {}},
                    ],
                },
            },
        },
    }  # fmt: skip

    owner = objects.owner_reference(
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": JID, "uid": "uid-9"}}
    )
    secret = objects.make_job_secret(launch, "alice/model", owner=owner, created_at=CREATED)
    assert validate(secret) == {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta
        | {
            "name": f"{JID}-run",
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": JID,
                    "uid": "uid-9",
                    "blockOwnerDeletion": False,
                }
            ],
        },
        "type": "Opaque",
        "immutable": True,
        "stringData": {
            "inputs.json": '{"n": 3, "name": "x"}',
            "uploads.json": '{"result.csv": "http://minio.test/results/j/result.csv?X-Amz-Signature=s"}',
        },
    }  # fmt: skip


def test_owner_reference_needs_a_uid():
    with pytest.raises(ValueError, match="no uid"):
        objects.owner_reference(
            {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"}}
        )


def test_created_at_round_trips():
    assert objects.parse_rfc3339(objects.rfc3339(CREATED)) == CREATED
    assert objects.parse_rfc3339("2023-11-14T22:13:20Z") == 1_700_000_000


# -- slugs --


@pytest.mark.parametrize("safe", [IID, JID, "abc", "a-b-c", "x" * 63, "alice-demo"])
def test_safe_names_pass_through(safe):
    assert slug(safe) == safe


ODD = [
    "",
    "-",
    "UPPER",
    "Upper",
    "upper",
    "with space",
    "a--b",
    "a-b",
    "9lives",
    "lives9",
    "ünïcödé",
    "a.b_c",
    "a/b",
    "trailing-",
    "x" * 64,
    "x" * 63 + "y",
    "x" * 200,
    "i-" + "0" * 300,
    "../../etc/passwd",
    "café",
    "cafe",
]


def test_odd_names_become_valid_unique_and_stay_the_same():
    slugs = [slug(text) for text in ODD]
    for text, made in zip(ODD, slugs, strict=True):
        assert DNS_1035.match(made), (text, made)
        assert len(made) <= 63
        assert slug(text) == made  # deterministic
    assert len(set(slugs)) == len(ODD)  # unique, even for names that clean up alike


def test_slugs_for_shorter_limits_and_label_values():
    assert len(slug("x" * 100, max_length=20)) == 20
    made = slug("owner_x.title_", extra="._")
    assert LABEL_VALUE.match(made) and made != slug("owner_x.title", extra="._")
    assert slug("owner_x.title", extra="._") == "owner_x.title"
    with pytest.raises(ValueError):
        slug("x", max_length=10)
    with pytest.raises(ValueError):
        slug("x", extra="/")


def test_warm_pod_and_its_launch():
    spec = job_spec(resources={"cpu": "500m", "memory": "1Gi"}, workdir="/app")
    pod = objects.make_warm_pod(
        spec, IID, template=template("job"), created_at=CREATED, program="print(1)",
        port=8787, token="t0ken",
    )  # fmt: skip
    data = validate(pod)
    labels = META["labels"] | {
        "app.kubernetes.io/component": "job",
        "spinyard.io/app": "alice.model",
        "spinyard.io/warm-runner": "true",
        "spinyard.io/pooled": "true",
    }
    assert data["metadata"] == {
        "annotations": {
            "spinyard.io/app-name": "alice/model",
            "spinyard.io/created-at": CREATED_TEXT,
        },
        "labels": labels,
        "name": IID,
    }
    assert data["spec"] == SECURE_POD | {
        "restartPolicy": "Never",
        "containers": [
            {
                "name": "job",
                "image": "registry.example.com/alice/model:3",
                "command": ["python", "-c", "print(1)"],
                "env": [
                    {"name": "HOME", "value": "/tmp"},
                    {"name": "MODE", "value": "fast"},
                    {"name": "RUNTIME", "value": "python"},
                    {"name": "SPINYARD_RUNNER_PORT", "value": "8787"},
                    {"name": "SPINYARD_RUNNER_TOKEN", "value": "t0ken"},
                    {
                        "name": "SPINYARD_RUNNER_HOST",
                        "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}},
                    },
                ],
                "ports": [{"name": "launch", "containerPort": 8787}],
                "readinessProbe": {
                    "httpGet": {"path": "/healthz", "port": "launch"},
                    "periodSeconds": 1,
                    "timeoutSeconds": 2,
                    "failureThreshold": 1,
                },
                "resources": {
                    "limits": {"cpu": "500m", "memory": "1Gi"},
                    "requests": {"cpu": "500m", "memory": "1Gi"},
                },
                "securityContext": SECURE_CONTAINER,
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            }
        ],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}}],
    }
    launch = JobLaunch(job_id=JID, inputs={"n": 3}, upload_urls={"result.csv": "u"}, deadline_s=9)
    assert objects.warm_launch(launch, spec) == {
        "job_id": JID,
        "inputs": {"n": 3},
        "upload_urls": {"result.csv": "u"},
        "argv": ["python", "-m", "model", "--seed={seed}"],
        "env": {
            "MODE": "fast",
            "RUNTIME": "python",
            "SPINYARD_JOB_ID": JID,
            "SPINYARD_APP": "alice/model",
            "SPINYARD_DEADLINE_S": "9",
        },
        "cwd": "/app",
    }


def test_warm_pod_needs_an_image():
    with pytest.raises(ValueError, match="no image"):
        objects.make_warm_pod(
            job_spec(image=None), IID, template=template("job"), created_at=CREATED,
            program="", port=8787, token="t",
        )  # fmt: skip
