"""What the local backend knows about each viz instance: one state file each, on disk.

Several handler processes may share one data dir, and an instance outlives
the handler that started it, so what is known about an instance lives in
files, never only in memory:

    <state_dir>/instances/<id>.json   pid, port, app, kind, pooled, created_at,
                                     the process start time and boot id
    <state_dir>/instances/<id>.lock   flock held while starting, stopping or relabelling

A state file is replaced atomically, so readers never see half of one, and
re-read only when it changed (`target()` is on the gateway's path for every
proxied request). The start time and boot id tell a live process from a
recycled pid (`processes.alive`).
"""

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict
from structlog.typing import FilteringBoundLogger

from dispatcher.backends.local import locks, processes
from handlers.ports import Instance


class InstanceState(BaseModel):
    """What the state file says about one instance."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    app: str
    kind: Literal["viz", "job", "warm"]  # warm: a warm job runner (warm.py)
    pid: int
    start_time: int  # clock ticks after boot: field 22 of /proc/<pid>/stat
    boot_id: str
    host: str
    port: int
    pooled: bool = False
    created_at: float

    @property
    def process(self) -> processes.Process:
        return processes.Process(self.pid, self.start_time, self.boot_id)

    def instance(self, alive: bool) -> Instance:
        """The instance as `list_instances` shows it."""
        common = self.model_dump(include={"id", "app", "kind", "created_at", "pooled"})
        return Instance(
            **common, alive=alive, labels={"pid": str(self.pid), "port": str(self.port)}
        )

    def fields(self) -> dict:
        """What log lines say about the instance."""
        return {"instance": self.id, "app": self.app, "pid": self.pid, "port": self.port}


class InstanceFiles:
    """The state files of every instance under one directory, with a cache of what they say."""

    def __init__(self, root: Path, log: FilteringBoundLogger) -> None:
        self.root = root
        self._log = log
        self._cache: dict[str, tuple[tuple[int, int, int], InstanceState | None]] = {}

    def ids(self) -> list[str]:
        """The ids of every state file, sorted; the cache forgets every other id."""
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            names = []
        ids = [n[: -len(".json")] for n in names if n.endswith(".json") and not n.startswith(".")]
        for stale in self._cache.keys() - set(ids):
            del self._cache[stale]
        return ids

    def all(self) -> list[InstanceState]:
        """The state of every instance with a readable state file, by id."""
        return [state for state in map(self.load, self.ids()) if state is not None]

    def path(self, instance_id: str) -> Path:
        return self.root / f"{instance_id}.json"

    def load(self, instance_id: str) -> InstanceState | None:
        """The instance's state, re-read only when its file changed; None if missing or corrupt."""
        path = self.path(instance_id)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._cache.pop(instance_id, None)
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._cache.get(instance_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            state: InstanceState | None = InstanceState.model_validate_json(path.read_bytes())
            if state.id != instance_id:
                raise ValueError(f"the file is about instance {state.id!r}")
        except FileNotFoundError:  # removed since the stat
            self._cache.pop(instance_id, None)
            return None
        except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            error = str(exc).splitlines()[0]
            self._log.warning("instance_state_unreadable", path=str(path), error=error)
            state = None
        self._cache[instance_id] = (key, state)
        return state

    def write(self, state: InstanceState) -> None:
        """Replace the state file atomically, so readers never see half of it."""
        processes.write_atomic(self.path(state.id), state.model_dump_json().encode())

    def remove(self, instance_id: str) -> None:
        """Forget the instance: its state file goes. The caller holds its lock."""
        self.path(instance_id).unlink(missing_ok=True)
        self._cache.pop(instance_id, None)

    @contextlib.asynccontextmanager
    async def locked(self, instance_id: str) -> AsyncIterator[Path]:
        """Hold the instance's lock file (shared by every process on this data dir)."""
        self.root.mkdir(parents=True, exist_ok=True)
        async with locks.locked(self.root / f"{instance_id}.lock") as path:
            yield path
