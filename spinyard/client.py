"""`AsyncClient`: the gateway's HTTP API for Python, for platforms' backends and CI.

It speaks what a page speaks (docs/events.md) and what a publisher speaks
(docs/publishing.md), typed with the models of `schemas`: publish, read, roll
back and remove app specs; set, list and remove their secrets; load an app and
wait for `ready`; submit a run and wait for its result; cancel it; follow
status over Server-Sent Events (`spinyard.sse`, which reconnects without
missing or repeating a status).
It imports nothing of spinyard but `schemas`, so a platform can use it
without the dispatcher's dependencies mattering to it.

Retries: an event is posted again, with the same id, after a 503 or a failed
connection (`tries` in all): the gateway de-duplicates events by id, so no
event is doubled. Reads are retried the same way. Publishing, rolling back and
removing are not: each answers what it did, and a retried rollback would make
a second revision.
"""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin

import aiohttp
from pydantic import BaseModel

from schemas import answers
from schemas.answers import Accepted, AppSummary, Published, PublishedSpec, RevisionList
from schemas.errors import ErrorBody
from schemas.events import Heartbeat, PageLoad, RunCancel, RunRequest
from schemas.spec import AppSpec
from schemas.status import AppState, AppStatus, JobState, JobStatus
from spinyard import specs, sse
from spinyard.errors import ApiError, LoadFailed, RunFailed, SpecError, Unreachable, WaitTimeout

ENDED = (AppState.STOPPING, AppState.STOPPED, AppState.FAILED)
# An ended status this much older than our page load's acceptance is history, not news (as in
# embed.js): it was there before we asked. The margin covers the clocks of gateway and handler.
STALE_S = 2.0

M = TypeVar("M", bound=BaseModel)


def new_session() -> str:
    """A fresh session id, `py-` and 20 hex digits (a browser tab's is `s-...`)."""
    return "py-" + uuid.uuid4().hex[:20]


class AsyncClient:
    """One gateway, one token, one HTTP connection pool; use it as an async context manager.

    Args:
        base_url: the gateway, e.g. `https://spinyard.example.org`.
        token: a JWT (docs/auth.md): `apps` to load and run, `publish` to publish.
        session: the session id events carry unless a call names another; default: a
            fresh one per client, so one client is one viewer (as a browser tab is).
        timeout_s: the limit of one request (status streams excepted).
        tries: attempts of an event or a read that met a 503 or no connection.
        retry_delay_s: the wait before the second attempt, doubled before each next.
        stream_idle_s: a status stream silent this long is reconnected (the gateway
            sends a keep-alive every `gateway.sse_keepalive_s`, 15 s).
    """

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        session: str | None = None,
        timeout_s: float = 30.0,
        tries: int = 3,
        retry_delay_s: float = 0.5,
        stream_idle_s: float = 45.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session or new_session()
        self.tries = max(1, tries)
        self.retry_delay_s = retry_delay_s
        self.stream_idle_s = stream_idle_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool (open status streams end with it)."""
        if self._http is not None:
            await self._http.close()
            self._http = None

    @property
    def http(self) -> aiohttp.ClientSession:
        """The connection pool, made on first use (it must be made inside the event loop)."""
        if self._http is None:
            self._http = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self._http

    # -- plumbing ------------------------------------------------------------------------

    async def _error(self, resp: aiohttp.ClientResponse) -> ApiError:
        """The gateway's error body as an `ApiError` (an answer without one says its status)."""
        try:
            info = ErrorBody.model_validate(await resp.json(content_type=None)).error
            return ApiError(resp.status, info.code, info.message)
        except (ValueError, aiohttp.ClientError):  # not JSON, or not the error body
            return ApiError(resp.status, "http_error", f"{resp.status} {resp.reason}")

    async def _call(self, method: str, path: str, *, retry: bool = False, **kw: Any) -> Any:
        """The answer's JSON (None for a 204); 503s and lost connections retried if `retry`.

        Raises:
            ApiError: an error answer.
            Unreachable: no connection (or only 503s) after the tries.
        """
        tries = self.tries if retry else 1
        for attempt in range(tries):
            if attempt:
                await asyncio.sleep(self.retry_delay_s * 2 ** (attempt - 1))
            try:
                async with self.http.request(method, self.base_url + path, **kw) as resp:
                    if resp.status < 400:
                        return await resp.json() if resp.status != 204 else None
                    error = await self._error(resp)
                    if resp.status != 503 or attempt == tries - 1:
                        raise error
            except (aiohttp.ClientError, TimeoutError) as exc:
                if attempt == tries - 1:
                    why = str(exc) or type(exc).__name__  # a timeout says nothing else
                    message = f"cannot reach the gateway at {self.base_url}: {why}"
                    raise Unreachable(message) from exc
        raise AssertionError("unreachable: the loop returns or raises")

    # -- apps: list and publish ------------------------------------------------------------

    async def apps(self) -> list[AppSummary]:
        """The registered apps (`GET /v1/apps`, public)."""
        return [
            AppSummary.model_validate(a) for a in await self._call("GET", "/v1/apps", retry=True)
        ]

    async def publish(
        self, spec: AppSpec | Mapping[str, Any] | Path | str, *, name: str | None = None
    ) -> Published:
        """Create or update an app (`PUT /v1/apps/{name}`): its new (or unchanged) revision.

        Args:
            spec: a spec file's path (YAML or JSON, sent as written, so the same file
                always has the same digest), a mapping, or an `AppSpec` (only the fields
                it was given are sent).
            name: `owner/title`; default: the spec's `name`.

        Raises:
            SpecError: the file cannot be read, or no name is given or found.
            ApiError: refused, e.g. 422 `invalid_spec` naming the field, 403 `forbidden`.
        """
        if isinstance(spec, str | Path):
            body, content_type, data = await asyncio.to_thread(specs.read_file, Path(spec))
        else:
            body, content_type, data = specs.as_json(spec)
        name = name or (data.get("name") if isinstance(data, dict) else None)
        if not isinstance(name, str) or "/" not in name:
            raise SpecError(f"{spec}: an app spec needs a `name` (owner/title)")
        headers = {"Content-Type": content_type}
        answer = await self._call("PUT", f"/v1/apps/{name}", data=body, headers=headers)
        return Published.model_validate(answer)

    async def app(self, name: str) -> PublishedSpec:
        """The app's current spec (presets expanded) and revision (publisher token)."""
        return PublishedSpec.model_validate(await self._call("GET", f"/v1/apps/{name}", retry=True))

    async def revisions(self, name: str) -> RevisionList:
        """The app's revisions kept, oldest first, and which is current (publisher token)."""
        answer = await self._call("GET", f"/v1/apps/{name}/revisions", retry=True)
        return RevisionList.model_validate(answer)

    async def rollback(self, name: str, revision: int) -> Published:
        """Make `revision`'s spec current again, as a new revision (publisher token)."""
        body = {"revision": revision}
        return Published.model_validate(
            await self._call("POST", f"/v1/apps/{name}/rollback", json=body)
        )

    async def remove(self, name: str) -> None:
        """Remove the app; its instances stop (`app_removed`), its history stays."""
        await self._call("DELETE", f"/v1/apps/{name}")

    # -- apps' secrets (publisher token; docs/publishing.md#app-secrets) --------------------

    async def set_secret(self, app: str, name: str, value: str) -> answers.SecretSet:
        """Set one of the app's secrets (the value is the body; no answer repeats it)."""
        put = {"data": value.encode(), "headers": {"Content-Type": "text/plain; charset=utf-8"}}
        answer = await self._call("PUT", f"/v1/apps/{app}/secrets/{name}", **put)
        return answers.SecretSet.model_validate(answer)

    async def secrets(self, app: str) -> list[str]:
        """The names of the app's secrets, sorted; never their values."""
        answer = await self._call("GET", f"/v1/apps/{app}/secrets", retry=True)
        return answers.SecretNames.model_validate(answer).names

    async def remove_secret(self, app: str, name: str) -> None:
        """Remove one of the app's secrets (`ApiError` 404 `not_found` if it is not set)."""
        await self._call("DELETE", f"/v1/apps/{app}/secrets/{name}")

    # -- events ------------------------------------------------------------------------------

    async def send(self, event: PageLoad | Heartbeat | RunRequest | RunCancel) -> Accepted:
        """Post one event (`POST /v1/events`); retried with its id, so never doubled."""
        body = event.model_dump(mode="json", exclude_none=True)
        return Accepted.model_validate(
            await self._call("POST", "/v1/events", json=body, retry=True)
        )

    async def heartbeat(self, app: str, session: str | None = None, *, idle_s: float = 0) -> None:
        """Tell spinyard a viewer still uses `app` (counted: visible, focused, `idle_s` ago)."""
        session = session or self.session
        await self.send(
            Heartbeat(app=app, session=session, visible=True, focused=True, idle_s=idle_s)
        )

    async def load(
        self, app: str, session: str | None = None, *, timeout_s: float = 120.0
    ) -> AppStatus:
        """Load a viz app as a page does, and wait until it is `ready`.

        Returns:
            The `ready` status, its `url` made absolute against the gateway's.

        Raises:
            LoadFailed: the app ended `failed` (the error's code and message, the
                status with its `log_tail`), or stopped before it was ready.
            WaitTimeout: not ready within `timeout_s` seconds (`last`: the last status).
            ApiError: the page load was refused (unknown app, forbidden, ...).
        """
        session = session or self.session
        last: AppStatus | None = None
        try:
            async with asyncio.timeout(timeout_s):
                before = await self.app_status(app, session)
                accepted = await self.send(PageLoad(app=app, session=session))
                async with contextlib.aclosing(self.watch_app(app, session)) as statuses:
                    live = False
                    async for status in statuses:
                        if not live and status.state in ENDED and _stale(status, before, accepted):
                            continue  # an earlier instance's end, there before we asked
                        last, live = status, True
                        if status.state is AppState.READY and status.url:
                            url = urljoin(self.base_url + "/", status.url)
                            return status.model_copy(update={"url": url})
                        if status.state in ENDED:
                            raise LoadFailed(status)
        except TimeoutError:
            raise WaitTimeout(f"loading {app}", timeout_s, last) from None
        raise AssertionError("unreachable: a status stream never ends by itself")

    async def run(
        self,
        app: str,
        inputs: Mapping[str, Any] | None = None,
        *,
        session: str | None = None,
        idempotency_key: str | None = None,
        revision: int | None = None,
    ) -> str:
        """Ask for one run of a job app: its job id (the run is `queued` at once).

        The same `idempotency_key` from the same session gives the same job id and no
        second run, so a retried CI step does not run twice. `revision` pins the run to
        one of the app's kept revisions (`revisions(app)`); a revision not kept is a
        404 `unknown_revision`.
        """
        event = RunRequest(
            app=app,
            session=session or self.session,
            inputs=dict(inputs or {}),
            idempotency_key=idempotency_key,
            revision=revision,
        )
        job_id = (await self.send(event)).job_id
        assert job_id is not None  # the gateway always answers a run request with one
        return job_id

    async def cancel(self, job_id: str, *, session: str | None = None) -> None:
        """Cancel a queued or running run; it ends `cancelled` (a finished one stays as it was)."""
        await self.send(RunCancel(job_id=job_id, session=session))

    async def result(
        self, job_id: str, *, timeout_s: float = 600.0, check: bool = True
    ) -> JobStatus:
        """Wait for the run to end: its final status (`results` with presigned URLs).

        Args:
            timeout_s: seconds to wait; the run itself goes on (cancel it if it should not).
            check: raise `RunFailed` unless it `succeeded` (as `subprocess.run`'s
                `check`); with False, any final status is returned.

        Raises:
            RunFailed: it ended `failed`, `timed_out` or `cancelled` (with `check`).
            WaitTimeout: it had not ended within `timeout_s`.
            ApiError: e.g. 404 `not_found`, no such run (or not yet recorded).
        """
        last: JobStatus | None = None
        try:
            async with asyncio.timeout(timeout_s):
                async with contextlib.aclosing(self.watch_job(job_id)) as statuses:
                    async for status in statuses:
                        last = status
                        if status.state.terminal:
                            break
        except TimeoutError:
            raise WaitTimeout(f"run {job_id}", timeout_s, last) from None
        assert last is not None
        if check and last.state is not JobState.SUCCEEDED:
            raise RunFailed(last)
        return last

    # -- status ------------------------------------------------------------------------------

    async def app_status(self, app: str, session: str | None = None) -> AppStatus | None:
        """The app's current status (for a per-session app, the session's), or None if it has
        none yet."""
        params = {"session": session or self.session}
        return await self._snapshot(f"/v1/apps/{app}/status", params, AppStatus)

    async def job(self, job_id: str) -> JobStatus | None:
        """The run's current status, or None if it has none yet."""
        return await self._snapshot(f"/v1/jobs/{job_id}", {}, JobStatus)

    async def _snapshot(self, path: str, params: dict[str, str], model: type[M]) -> M | None:
        try:
            return model.model_validate(await self._call("GET", path, params=params, retry=True))
        except ApiError as exc:
            if exc.code == "not_found" and exc.status == 404:
                return None
            raise

    def watch_app(self, app: str, session: str | None = None) -> AsyncIterator[AppStatus]:
        """The app's current status, then each change, until you stop iterating.

        For a per-session app the status is the session's (default: the client's).
        """
        params = {"session": session or self.session}
        return self._follow(f"/v1/apps/{app}/status", params, AppStatus)

    def watch_job(self, job_id: str) -> AsyncIterator[JobStatus]:
        """The run's current status, then each change, until you stop iterating."""
        return self._follow(f"/v1/jobs/{job_id}/status", {}, JobStatus)

    def _follow(self, path: str, params: dict[str, str], model: type[M]) -> AsyncIterator[M]:
        return sse.follow(
            self.http,
            self.base_url + path,
            params,
            model,
            error_of=self._error,
            idle_s=self.stream_idle_s,
            tries=self.tries,
        )


def _stale(status: AppStatus, before: AppStatus | None, accepted: Accepted) -> bool:
    """Whether an ended status was there before our page load, so it is not its answer.

    It is the status read just before the load was sent (a start that failed a
    second ago is that, though within `STALE_S` of our load), or older than
    the load's acceptance by more than the clocks of gateway and handler differ.
    """
    return status == before or status.time < accepted.time - STALE_S
