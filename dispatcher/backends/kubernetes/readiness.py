"""Whether a viz instance is ready, from what the Deployment and Pod informers see.

Each viz instance has an entry: its Deployment, its pods, when a pod was
first scheduled, started and ready, and an event set on every change, so a
wait wakes on the watch event instead of polling. What the objects mean is
`status.viz_verdict`'s to say; this module only keeps them by instance and
waits. Job pods are the run reports' (job_reports.py), not this module's.
"""

import asyncio
import contextlib

from dispatcher.backends.kubernetes import objects, status
from dispatcher.backends.kubernetes.informer import Informer
from handlers.errors import PermanentError


class _Viz:
    """What the informers said about one viz instance, and an event set on each change."""

    __slots__ = ("changed", "deployment", "phases", "pods")

    def __init__(self) -> None:
        self.deployment: dict | None = None
        self.pods: dict[str, dict] = {}
        self.phases: dict[str, float] = {}
        self.changed = asyncio.Event()

    def touch(self) -> None:
        """Wake everyone waiting on this instance; later waiters get a fresh event."""
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()


class Readiness:
    """Viz instances by id, as the Deployment and Pod informers report them."""

    def __init__(self, deployments: Informer, pods: Informer) -> None:
        self._informers = (deployments, pods)
        self._viz: dict[str, _Viz] = {}
        deployments.on(self._on_deployment, self._deployment_gone, self._refused)
        pods.on(self._on_pod, self._pod_gone, self._refused)

    def knows(self, instance_id: str) -> bool:
        """Whether the informers have seen the instance's Deployment."""
        entry = self._viz.get(instance_id)
        return entry is not None and entry.deployment is not None

    def phases(self, instance_id: str) -> dict[str, float]:
        """Unix times at which the instance's pod was scheduled, started and ready, as seen."""
        entry = self._viz.get(instance_id)
        return dict(entry.phases) if entry else {}

    async def wait(self, instance_id: str, deadline: float) -> tuple[str, str, dict | None]:
        """Wait until the instance is ready, failed or gone, or the loop time `deadline` passes.

        Returns:
            `status.viz_verdict`'s (verdict, why, pod) at that moment: pending at the deadline.

        Raises:
            handlers.errors.PermanentError: an informer's API refusal (e.g. 403).
        """
        loop = asyncio.get_running_loop()
        while True:
            for informer in self._informers:
                if informer.error is not None:
                    raise informer.error
            entry = self._viz.get(instance_id) or _Viz()
            changed = entry.changed
            verdict, message, pod = status.viz_verdict(entry.deployment, entry.pods.values())
            remaining = deadline - loop.time()
            if verdict != status.PENDING or remaining <= 0:
                return verdict, message, pod
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await changed.wait()

    def _entry(self, instance_id: str) -> _Viz:
        entry = self._viz.get(instance_id)
        if entry is None:
            entry = self._viz[instance_id] = _Viz()
        return entry

    def _settle(self, instance_id: str, entry: _Viz) -> None:
        """Wake the entry's waiters; drop it once nothing of it is left."""
        if entry.deployment is None and not entry.pods:
            del self._viz[instance_id]
        entry.touch()

    def _on_deployment(self, deployment: dict) -> None:
        instance_id = status.label(deployment, objects.INSTANCE)
        if instance_id is not None:
            entry = self._entry(instance_id)
            entry.deployment = deployment
            self._settle(instance_id, entry)

    def _deployment_gone(self, deployment: dict) -> None:
        instance_id = status.label(deployment, objects.INSTANCE)
        if instance_id is not None:
            entry = self._entry(instance_id)
            entry.deployment = None
            self._settle(instance_id, entry)

    def _on_pod(self, pod: dict) -> None:
        found = _viz_pod(pod)
        if found is not None:
            instance_id, name = found
            entry = self._entry(instance_id)
            entry.pods[name] = pod
            status.note_phases(entry.phases, pod)
            self._settle(instance_id, entry)

    def _pod_gone(self, pod: dict) -> None:
        found = _viz_pod(pod)
        if found is not None:
            instance_id, name = found
            entry = self._entry(instance_id)
            entry.pods.pop(name, None)
            self._settle(instance_id, entry)

    def _refused(self, _exc: PermanentError) -> None:
        """An informer failed: wake every waiter, so it raises the informer's error."""
        for entry in self._viz.values():
            entry.touch()


def _viz_pod(pod: dict) -> tuple[str, str] | None:
    """(instance id, pod name) of a viz instance's pod; None for a run's pod or a stranger."""
    owner = status.label(pod, objects.INSTANCE)
    name = (pod.get("metadata") or {}).get("name")
    if owner is None or name is None or status.label(pod, objects.COMPONENT) == "job":
        return None
    return owner, name
