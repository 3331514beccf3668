"""How spinyard's Kubernetes objects are named, labelled and found again.

Everything spinyard creates carries `app.kubernetes.io/managed-by=spinyard`
(the backend lists and watches by it), `app.kubernetes.io/component=viz|job`
(the NetworkPolicies select on it), `spinyard.io/app` and
`spinyard.io/instance`, and a created-at annotation; an app's Secret of
secrets (`app_secrets_name`) has the component `secrets` and no instance. A
warm runner's pod also carries `spinyard.io/warm-runner=true` (its
NetworkPolicy selects on it) and `spinyard.io/pooled` (true until it is
handed a run; then its instance label names the run). Names come from
`slugs.slug` of the instance or job id, so any object can be found from the
id alone. The builders (`objects.py`, `pods.py`) use these; `status.py`
reads them back. Pure: nothing here talks to the API.
"""

import datetime
from typing import Literal

from kubernetes import client

from dispatcher.backends.kubernetes.slugs import slug

MANAGED_BY, MANAGER = "app.kubernetes.io/managed-by", "spinyard"
COMPONENT = "app.kubernetes.io/component"
APP = "spinyard.io/app"  # owner.title, made a valid label value
INSTANCE = "spinyard.io/instance"
POOLED = "spinyard.io/pooled"
WARM = "spinyard.io/warm-runner"  # "true" on a warm runner's pod, claimed or not
APP_NAME = "spinyard.io/app-name"  # annotation: owner/title exactly, as label values cannot
CREATED_AT = "spinyard.io/created-at"  # annotation: RFC 3339, UTC
SELECTOR = f"{MANAGED_BY}={MANAGER}"


def object_name(instance_id: str) -> str:
    """The name of every object of a viz instance or a run: its id, made safe."""
    return slug(instance_id)


def secret_name(job_id: str) -> str:
    """The name of a run's inputs Secret."""
    return slug(f"{job_id}-run")


def app_secrets_name(app: str) -> str:
    """The name of an app's Secret of secrets: `spinyard-secrets-<owner>.<title>`, made safe."""
    return slug(f"spinyard-secrets-{app.replace('/', '.')}", extra=".")


def app_label(app: str) -> str:
    """The `spinyard.io/app` label value of `owner/title`: `owner.title` when that fits."""
    return slug(app.replace("/", "."), extra="._")


def labels(app: str, instance_id: str, component: Literal["viz", "job"]) -> dict[str, str]:
    """The labels every object of an instance or run carries."""
    return {
        MANAGED_BY: MANAGER,
        COMPONENT: component,
        APP: app_label(app),
        INSTANCE: instance_id,
    }


def rfc3339(t: float) -> str:
    """Unix time `t` as RFC 3339 UTC with microseconds, as the created-at annotation holds it."""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(text: str) -> float:
    """The Unix time of an RFC 3339 timestamp (Kubernetes' or ours).

    Raises:
        ValueError: not a timestamp.
    """
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def metadata(
    name: str,
    app: str,
    instance_id: str,
    component: Literal["viz", "job"],
    created_at: float,
    owner: client.V1OwnerReference | None = None,
    extra_labels: dict[str, str] | None = None,
) -> client.V1ObjectMeta:
    """The metadata of one object of an instance or run: its name, labels and annotations."""
    return client.V1ObjectMeta(
        name=name,
        labels=labels(app, instance_id, component) | (extra_labels or {}),
        annotations={APP_NAME: app, CREATED_AT: rfc3339(created_at)},
        owner_references=[owner] if owner is not None else None,
    )


def owner_reference(obj: dict) -> client.V1OwnerReference:
    """A reference to `obj` (as the API returned it) for objects that should go with it.

    `blockOwnerDeletion` stays false: setting it needs rights on the owner's
    finalizers, which the Role does not grant.

    Raises:
        ValueError: `obj` has no uid (it was not returned by the API server).
    """
    meta = obj.get("metadata") or {}
    if not meta.get("uid"):
        raise ValueError(f"{obj.get('kind')} {meta.get('name')} has no uid")
    return client.V1OwnerReference(
        api_version=obj["apiVersion"],
        kind=obj["kind"],
        name=meta["name"],
        uid=meta["uid"],
        block_owner_deletion=False,
    )
