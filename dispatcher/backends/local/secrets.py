"""The local backend's secret store: a 0600 JSON file per app under the data dir.

`<data_dir>/local/secrets/<owner>/<title>.json` holds `{"NAME": "value"}`,
in directories only the user running spinyard may enter (0700). The gateway
and the CLI write it (`SecretStore`); the backend reads it when it starts an
instance or a run of an app whose spec names secrets. Writers hold a lock file
beside it, so two writers never lose each other's change, and replace the file
at once, so a reader never sees half of one. A gateway on another machine
writes a different disk: the local backend is one machine's, and its gateway
must share its data dir (docs/publishing.md).
"""

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

from dispatcher.backends.local import locks, processes
from dispatcher.backends.secrets import SecretStore, missing_secret
from schemas.names import split_app
from schemas.spec import AppSpec


class SecretFiles(SecretStore):
    """Secrets in one 0600 file per app under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def under(cls, data_dir: Path) -> "SecretFiles":
        """The store of the data dir `data_dir` (the one its local backend reads)."""
        return cls(Path(data_dir) / "local" / "secrets")

    def path(self, app: str) -> Path:
        owner, title = split_app(app)
        return self.root / owner / f"{title}.json"

    def read(self, app: str) -> dict[str, str]:
        """The app's secrets, values included (empty if none)."""
        try:
            return json.loads(self.path(app).read_bytes())
        except FileNotFoundError:
            return {}

    def resolve(self, spec: AppSpec) -> dict[str, str]:
        """The values of the secrets `spec` names, and only those.

        Raises:
            handlers.errors.StartFailed: `missing_secret`, naming the first one not set.
        """
        if not spec.secrets:
            return {}
        have = self.read(spec.name)
        for name in spec.secrets:
            if name not in have:
                raise missing_secret(spec.name, name)
        return {name: have[name] for name in spec.secrets}

    async def names(self, app: str) -> list[str]:
        return sorted(self.read(app))

    async def put(self, app: str, name: str, value: str) -> bool:
        async with self._changing(app) as have:
            new = name not in have
            have[name] = value
        return new

    async def remove(self, app: str, name: str) -> bool:
        async with self._changing(app) as have:
            return have.pop(name, None) is not None

    @contextlib.asynccontextmanager
    async def _changing(self, app: str) -> AsyncIterator[dict[str, str]]:
        """The app's secrets, locked while the block changes them; written back after it."""
        path = self.path(app)
        for directory in (self.root, path.parent):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o700)
        async with locks.locked(path.with_suffix(".lock")):
            before = self.read(app)
            have = dict(before)
            yield have
            if have != before:
                processes.write_atomic(path, json.dumps(have, sort_keys=True).encode(), 0o600)
