"""`Client`: the same calls as `AsyncClient`, for scripts and CI steps that are not async.

Each call runs the async one on the client's own event loop, in a thread of
its own, and waits for it. A private loop rather than `asyncio.run` per call:
the HTTP connection pool belongs to one loop and is kept between calls, and
the client also works where a loop already runs in the calling thread (a
notebook, a web framework's handler), which `asyncio.run` refuses.
"""

import asyncio
import threading
from collections.abc import Awaitable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from schemas.answers import AppSummary, Published, PublishedSpec, RevisionList, SecretSet
from schemas.spec import AppSpec
from schemas.status import AppStatus, JobStatus
from spinyard.client import AsyncClient

T = TypeVar("T")


class Client:
    """A blocking client; arguments as `AsyncClient`'s. Use it as a context manager, or
    call `close()`."""

    def __init__(self, base_url: str, token: str | None = None, **options: Any) -> None:
        self.aio = AsyncClient(base_url, token, **options)  # first: bad options start no thread
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="spinyard-client", daemon=True
        )
        self._thread.start()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def session(self) -> str:
        return self.aio.session

    def close(self) -> None:
        """Close the connection pool and stop the client's loop and thread."""
        if self._loop.is_closed():
            return
        self._wait(self.aio.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def _wait(self, awaitable: Awaitable[T]) -> T:
        """Run `awaitable` on the client's loop; its result, or what it raised."""

        async def wrapped() -> T:  # an async generator's step is awaitable, not a coroutine
            return await awaitable

        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result()

    def apps(self) -> list[AppSummary]:
        return self._wait(self.aio.apps())

    def publish(
        self, spec: AppSpec | Mapping[str, Any] | Path | str, *, name: str | None = None
    ) -> Published:
        return self._wait(self.aio.publish(spec, name=name))

    def app(self, name: str) -> PublishedSpec:
        return self._wait(self.aio.app(name))

    def revisions(self, name: str) -> RevisionList:
        return self._wait(self.aio.revisions(name))

    def rollback(self, name: str, revision: int) -> Published:
        return self._wait(self.aio.rollback(name, revision))

    def remove(self, name: str) -> None:
        self._wait(self.aio.remove(name))

    def set_secret(self, app: str, name: str, value: str) -> SecretSet:
        return self._wait(self.aio.set_secret(app, name, value))

    def secrets(self, app: str) -> list[str]:
        return self._wait(self.aio.secrets(app))

    def remove_secret(self, app: str, name: str) -> None:
        self._wait(self.aio.remove_secret(app, name))

    def heartbeat(self, app: str, session: str | None = None, *, idle_s: float = 0) -> None:
        self._wait(self.aio.heartbeat(app, session, idle_s=idle_s))

    def load(self, app: str, session: str | None = None, *, timeout_s: float = 120.0) -> AppStatus:
        return self._wait(self.aio.load(app, session, timeout_s=timeout_s))

    def run(
        self,
        app: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        session: str | None = None,
        idempotency_key: str | None = None,
        revision: int | None = None,
    ) -> str:
        return self._wait(
            self.aio.run(
                app, inputs, session=session, idempotency_key=idempotency_key, revision=revision
            )
        )

    def cancel(self, job_id: str, *, session: str | None = None) -> None:
        self._wait(self.aio.cancel(job_id, session=session))

    def result(self, job_id: str, *, timeout_s: float = 600.0, check: bool = True) -> JobStatus:
        return self._wait(self.aio.result(job_id, timeout_s=timeout_s, check=check))

    def app_status(self, app: str, session: str | None = None) -> AppStatus | None:
        return self._wait(self.aio.app_status(app, session))

    def job(self, job_id: str) -> JobStatus | None:
        return self._wait(self.aio.job(job_id))

    def watch_app(self, app: str, session: str | None = None) -> Iterator[AppStatus]:
        """As `AsyncClient.watch_app`, blocking for each status; `break` ends the stream."""
        return self._iterate(self.aio.watch_app(app, session))

    def watch_job(self, job_id: str) -> Iterator[JobStatus]:
        """As `AsyncClient.watch_job`, blocking for each status; `break` ends the stream."""
        return self._iterate(self.aio.watch_job(job_id))

    def _iterate(self, statuses: Any) -> Iterator[Any]:
        """Each item of an async iterator, got on the client's loop; closed when left."""
        try:
            while True:
                try:
                    yield self._wait(statuses.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._wait(statuses.aclose())
