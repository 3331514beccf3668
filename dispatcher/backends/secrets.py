"""Where an app's secrets are kept: the port, and the start check both backends share.

An app's secrets are name/value pairs set by its publisher (`spinyard secrets
set`, `PUT /v1/apps/{owner}/{title}/secrets/{NAME}`); its spec lists the
names it needs (`secrets: [DB_URL]`), and each reaches its instances' and
runs' environment as the variable of that name, nothing else of them.

Values never travel over NATS: the gateway (or the CLI) writes them straight
to the store the backend reads, `SecretStore`, which has one implementation
per backend: `local.secrets.SecretFiles` (a 0600 file per app under the data
dir) and `kubernetes.secrets.SecretObjects` (a Secret per app in the apps
namespace). The composition root (`dispatcher.compose.secret_store`) picks
the one of `settings.backend.kind`. Only names are ever logged, listed or put
in an error message; a value is read only where it is handed to an app.
"""

import abc
from collections.abc import Iterable

from handlers.errors import StartFailed
from schemas import errors as codes
from schemas.spec import AppSpec


class SecretStore(abc.ABC):
    """An app's secrets by name. Apps are `owner/title`, names checked by the caller
    (`schemas.names.check_secret_name`)."""

    async def setup(self) -> None:  # noqa: B027 - optional hook
        """Connect, if the store needs to. Called once before use."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    @abc.abstractmethod
    async def names(self, app: str) -> list[str]:
        """The names of the app's secrets, sorted (none: empty)."""

    @abc.abstractmethod
    async def put(self, app: str, name: str, value: str) -> bool:
        """Set one secret; True if it is new, False if it replaced a value."""

    @abc.abstractmethod
    async def remove(self, app: str, name: str) -> bool:
        """Remove one secret; False if it was not set."""


def missing_secret(app: str, name: str) -> StartFailed:
    """The start failure of an app whose spec names a secret that is not set: its name only."""
    return StartFailed(
        f"the app's secret {name} is not set: set it with spinyard secrets set {app} {name}",
        code=codes.MISSING_SECRET,
    )


def check_secrets(spec: AppSpec, have: Iterable[str]) -> None:
    """Raise `missing_secret` for the first of the spec's secrets not in `have`.

    Raises:
        handlers.errors.StartFailed: `missing_secret`, naming the secret.
    """
    found = set(have)
    for name in spec.secrets:
        if name not in found:
            raise missing_secret(spec.name, name)
