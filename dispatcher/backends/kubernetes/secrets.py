"""The Kubernetes backend's secret store: one Secret per app in the apps namespace.

An app's secrets are the keys of the Secret `spinyard-secrets-<owner>.<title>`
(`meta.app_secrets_name`), labelled as spinyard's with the component
`secrets`. Pods get them through `secretKeyRef` (`pods.with_secrets`), so the
kubelet reads the values and no Deployment or Job holds one.

The gateway (its own service account, k8s/base/rbac.yaml) writes with
`get`, `create` and `patch`: a merge patch sets one key (`data.NAME`) or
removes it (`data.NAME: null`), so concurrent changes of different names
never undo each other, and the Secret is created on the first one. An app's
Secret stays when its last secret is removed (the gateway has no `delete`).
The backend only checks which names exist before a start (`names`, a `get`
its Role already had for the runs' inputs Secrets).
"""

import base64

from kubernetes import client

from dispatcher.backends.kubernetes.api import KubeApi
from dispatcher.backends.kubernetes.meta import (
    APP,
    APP_NAME,
    COMPONENT,
    MANAGED_BY,
    MANAGER,
    app_label,
    app_secrets_name,
)
from dispatcher.backends.kubernetes.resources import SECRETS
from dispatcher.backends.secrets import SecretStore
from dispatcher.backends.settings import KubernetesBackendSettings

COMPONENT_SECRETS = "secrets"


def make_app_secret(app: str, name: str, value: str) -> client.V1Secret:
    """The Secret of an app's secrets, made with its first one."""
    return client.V1Secret(
        api_version="v1",
        kind="Secret",
        metadata=client.V1ObjectMeta(
            name=app_secrets_name(app),
            labels={MANAGED_BY: MANAGER, COMPONENT: COMPONENT_SECRETS, APP: app_label(app)},
            annotations={APP_NAME: app},
        ),
        type="Opaque",
        data={name: _encode(value)},
    )


class SecretObjects(SecretStore):
    """Secrets as the keys of a Secret per app, through `api` (a `KubeApi` of its own, or
    the backend's)."""

    def __init__(self, api: KubeApi, *, owned: bool = False) -> None:
        self.api = api
        self._owned = owned  # whether `setup` and `close` connect and close `api`

    @classmethod
    def connecting(
        cls, settings: KubernetesBackendSettings, configuration: client.Configuration | None = None
    ) -> "SecretObjects":
        """A store with an API client of its own (the gateway's, the CLI's), made in `setup`."""
        return cls(KubeApi(settings, configuration), owned=True)

    async def setup(self) -> None:
        if self._owned:
            await self.api.connect()

    async def close(self) -> None:
        if self._owned:
            self.api.close()

    async def names(self, app: str) -> list[str]:
        found = await self.api.get(SECRETS, app_secrets_name(app))
        return sorted((found or {}).get("data") or {})

    async def put(self, app: str, name: str, value: str) -> bool:
        existed = name in await self.names(app)
        patch = {"data": {name: _encode(value)}}
        if await self.api.patch(SECRETS, app_secrets_name(app), patch) is None:
            if await self.api.create(SECRETS, make_app_secret(app, name, value)) is None:
                await self.api.patch(SECRETS, app_secrets_name(app), patch)  # made meanwhile
        return not existed

    async def remove(self, app: str, name: str) -> bool:
        if name not in await self.names(app):
            return False
        await self.api.patch(SECRETS, app_secrets_name(app), {"data": {name: None}})
        return True


def _encode(value: str) -> str:
    return base64.b64encode(value.encode()).decode()
