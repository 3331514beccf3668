"""What handlers need from the outside world, as abstract classes.

Handlers reach processes and Kubernetes only through `Backend`, and object
storage only through `ObjectStore`. The implementations live in
`dispatcher.backends` and `dispatcher.store`; tests may pass their own.
"""

import abc
import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from handlers.errors import StartFailed
from schemas.errors import START_FAILED
from schemas.events import JobUpdate
from schemas.spec import AppSpec

JobReport = Callable[[JobUpdate], Awaitable[None]]

# What a warm runner did with a run handed to it (`Backend.submit_warm`): "running",
# its process has started (the handler records the run running at once); "taken", it
# has the run, whose start the backend reports as it reports a cold run's.
WarmHandOver = Literal["running", "taken"]


@dataclass(frozen=True)
class Instance:
    """One thing a backend runs for spinyard: a viz instance, a job, or a warm job runner."""

    id: str
    app: str
    kind: Literal["viz", "job", "warm"]
    created_at: float
    pooled: bool = False
    alive: bool = True
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobLaunch:
    """Everything a job needs to run, and nothing more (no credentials)."""

    job_id: str
    inputs: dict
    upload_urls: dict[str, str]
    deadline_s: float


class Backend(abc.ABC):
    """Runs viz instances and jobs. Every method is idempotent."""

    name: str = "abstract"
    warm_runners: bool = False  # whether `start_warm` and `submit_warm` work

    async def setup(self) -> None:  # noqa: B027 - optional hook
        """Load configuration and connect. Called once before use."""

    async def cleanup(self) -> None:  # noqa: B027 - optional hook
        """Release connections. Leaves running instances alone."""

    @abc.abstractmethod
    async def start_viz(self, instance_id: str, spec: AppSpec, *, pooled: bool = False) -> None:
        """Start a viz instance; return at once. Starting one that exists does nothing."""

    @abc.abstractmethod
    async def wait_ready(self, instance_id: str, spec: AppSpec, timeout: float) -> None:  # noqa: ASYNC109
        """Wait until the instance answers its readiness probe.

        Raises:
            handlers.errors.StartFailed: it exited, or was not ready within `timeout`.
        """

    @abc.abstractmethod
    def url(self, instance_id: str, spec: AppSpec) -> str:
        """The URL a browser opens to reach the instance."""

    @abc.abstractmethod
    async def stop_viz(self, instance_id: str) -> None:
        """Stop an instance (or a warm runner): gracefully, then by force. Stopping one that is
        gone does nothing."""

    @abc.abstractmethod
    async def claim(self, instance_id: str) -> bool:
        """Mark a warm pool instance (or warm runner) as in use (relabel), if it still serves.

        A quick check, on the path of a page load or a run's start: True if the
        instance is there and alive (and now marked in use); False if it is gone or dead.
        """

    async def start_warm(self, instance_id: str, spec: AppSpec, timeout: float) -> None:  # noqa: ASYNC109
        """Start a warm runner for a job app's pool; return once it waits for a run.
        Starting one that runs does nothing.

        Raises:
            handlers.errors.StartFailed: it could not start (this backend keeps no warm
                runners, unless `warm_runners`).
        """
        raise StartFailed(f"the {self.name} backend keeps no warm runners", code=START_FAILED)

    async def submit_warm(
        self, launch: "JobLaunch", spec: AppSpec, instance_id: str
    ) -> WarmHandOver | None:
        """Start a job on a claimed warm runner: "running" once its process has started,
        "taken" if the runner has it but did not say it started (a run it had already,
        say); None if it could not take the run (then the runner is stopped and the
        caller starts the job cold with `submit_job`)."""
        return None

    def phases(self, instance_id: str) -> dict[str, float]:
        """Unix times the backend itself saw for the instance (e.g. a pod's scheduled,
        started, ready); empty when it observes none. They refine the status's phases."""
        return {}

    async def target(self, instance_id: str) -> tuple[str, str] | None:
        """(app, base URL) the gateway proxies to, for backends the gateway fronts; else None."""
        return None

    @abc.abstractmethod
    async def list_instances(self) -> list[Instance]:
        """Everything this backend runs for spinyard, found by label or state dir."""

    async def submit_job(self, launch: JobLaunch, spec: AppSpec) -> None:
        """Start a job. Submitting one that exists does nothing."""
        raise NotImplementedError(f"the {self.name} backend does not run jobs yet")

    async def cancel_job(self, job_id: str) -> None:
        """Stop a job. Cancelling one that is gone does nothing."""
        raise NotImplementedError(f"the {self.name} backend does not run jobs yet")

    async def watch_jobs(self, report: JobReport, stopping: asyncio.Event) -> None:
        """Call `report` for each change of a job's state until `stopping` is set.

        Reports may repeat (they are de-duplicated downstream by job and state).
        A backend that runs no jobs just waits.
        """
        await stopping.wait()


@dataclass(frozen=True)
class StoredResult:
    """One result object of a finished run."""

    key: str
    name: str
    size: int
    url: str


class ObjectStore(abc.ABC):
    """Where run results live. Unreachable storage raises a `RetryableError`."""

    @abc.abstractmethod
    def upload_urls(self, job_id: str, names: list[str]) -> dict[str, str]:
        """Presigned PUT URLs, one per declared output name."""

    @abc.abstractmethod
    async def collect(self, job_id: str, expected: list[str]) -> list[StoredResult]:
        """Check a run's uploads against `expected`; results with GET URLs.

        Raises:
            handlers.errors.PermanentError: an output is missing or unexpected; the
                run's page reads its message only if it is also a `PublicError`.
            handlers.errors.RetryableError: the store did not answer.
        """

    @abc.abstractmethod
    async def delete_job(self, job_id: str) -> int:
        """Delete all of a run's objects; returns how many."""
