"""The one module that calls the Kubernetes API, with the official (synchronous) client.

Every request goes through `KubeApi`: blocking calls run in a worker thread
(`asyncio.to_thread`), watch streams in a thread of their own each (a watch
waits for minutes; in the shared pool it would starve the other calls).
Configuration is loaded in `connect()`, never at import: in-cluster when
spinyard runs in a pod, else from a kubeconfig.

Requests use the client's `ApiClient` (auth, TLS, token refresh) on plain
resource paths, so one code path serves built-in kinds and Traefik's
IngressRoute alike, and answers stay plain dicts: deserialising a
2,000-Deployment list (4.9 MB) into the client's `V1DeploymentList` took
235 ms, `json.loads` of it 27 ms (medians of 7, kubernetes 37.0.1, Python
3.11, 2 shared cores). What an answer means is decided here, once:

- 2xx: the object, or the list;
- 409 on create: already there (returns None: the caller reads it if it needs it);
- 404 on get, patch, delete: not there (None / False);
- 429, 5xx, timeouts, refused connections: retried with exponential backoff
  and jitter (Retry-After honoured), `api_tries` attempts in all, then
  `handlers.errors.RetryableError` (a best-effort list, a pod's Events, tries once);
- 403: `ApiError(code="forbidden")` naming the verb and resource the
  service account lacks; 401: `ApiError(code="unauthorized")`;
- anything else: `ApiError` with the server's message.

Every request is recorded as (verb, apiGroup, resource) in `KubeApi.calls`,
so a test can hold what the backend does against the Role in
k8s/base/rbac.yaml. Label selectors are the server's to apply. One watch
request is one `KubeApi.watch` stream; listing, resuming and relisting are
the informer's (informer.py).
"""

import asyncio
import collections
import contextlib
import json
import random
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client
from kubernetes.watch.watch import iter_resp_lines

from dispatcher import logs
from dispatcher.backends.kubernetes.clientconfig import load_configuration
from dispatcher.backends.kubernetes.resources import PODS, Resource
from dispatcher.backends.settings import KubernetesBackendSettings
from handlers.errors import PermanentError, RetryableError
from schemas import errors as codes

Call = tuple[str, str, str]  # (verb, apiGroup, resource), as in an RBAC rule
Query = list[tuple[str, Any]]  # (the class below has a method named `list`)
RETRIED = frozenset({429, 500, 502, 503, 504})
_METHODS = dict(create="POST", get="GET", list="GET", watch="GET", patch="PATCH", delete="DELETE")
_PATCH_TYPE = "application/merge-patch+json"  # works for custom objects too
_WATCH_SLACK_S = 15.0  # a watch that sends nothing this long past its timeoutSeconds is dead


class ApiError(PermanentError):
    """The API refused a request, and asking again will not change that."""

    def __init__(self, message: str, *, status: int, code: str = codes.INTERNAL) -> None:
        super().__init__(message, code=code)
        self.status = status


class Gone(Exception):
    """A watch's resourceVersion is too old: list again."""


@dataclass(frozen=True)
class _Request:
    """One request: the RBAC verb it needs, on which resource, where, with what."""

    verb: str  # create, get, list, watch, patch, delete: the HTTP method follows
    res: Resource
    path: str
    body: Any = None
    content_type: str = "application/json"
    query: Query | None = None
    sub: str | None = None  # a subresource, e.g. "log"
    limit_s: float | None = None  # a best-effort request: one try, this timeout each way


class _Answer:
    """One HTTP answer: status, headers, body (read in the worker thread)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: Any, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def message(self) -> str:
        """The server's reason, from a Status object if there is one."""
        try:
            status = json.loads(self.body)
            if isinstance(status, dict) and status.get("message"):
                return str(status["message"])
        except ValueError:
            pass
        return self.body[:200].decode(errors="replace").strip() or f"HTTP {self.status}"


class KubeApi:
    """Namespaced create, get, list, patch, delete, logs and watch, with retries and records."""

    def __init__(
        self,
        settings: KubernetesBackendSettings,
        configuration: client.Configuration | None = None,
    ) -> None:
        self.settings = settings
        self.namespace = settings.namespace
        self.calls: collections.Counter[Call] = collections.Counter()
        self._calls_lock = threading.Lock()  # worker threads count concurrently
        self._configuration = configuration
        self._client: client.ApiClient | None = None
        self._log = logs.get("spinyard.backend.kubernetes")

    async def connect(self) -> None:
        """Load the configuration (unless given) and make the client. Call once, before use."""
        if self._client is not None:
            return
        cfg = self._configuration or await asyncio.to_thread(load_configuration, self.settings)
        cfg.retries = False  # retries are ours: bounded, with backoff, and recorded
        self._client = client.ApiClient(cfg)

    def close(self) -> None:
        """Drop pooled connections."""
        if self._client is not None:
            self._client.rest_client.close()
            self._client = None

    # -- the verbs --

    async def create(self, res: Resource, body: Any) -> dict | None:
        """Create an object; None if one of that name exists (409)."""
        answer = await self._call(_Request("create", res, res.path(self.namespace), body), {409})
        return None if answer.status == 409 else answer.json()

    async def get(self, res: Resource, name: str) -> dict | None:
        """The object, or None if there is none."""
        answer = await self._call(_Request("get", res, res.path(self.namespace, name)), {404})
        return None if answer.status == 404 else answer.json()

    async def patch(self, res: Resource, name: str, patch: dict) -> dict | None:
        """Apply a JSON merge patch; None if there is no such object."""
        request = _Request("patch", res, res.path(self.namespace, name), patch, _PATCH_TYPE)
        answer = await self._call(request, {404})
        return None if answer.status == 404 else answer.json()

    async def delete(self, res: Resource, name: str, propagation: str = "Background") -> bool:
        """Delete an object (dependents by `propagation`); False if it was not there."""
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": propagation}
        request = _Request("delete", res, res.path(self.namespace, name), body)
        answer = await self._call(request, {404})
        return answer.status != 404

    async def list(
        self, res: Resource, selector: str, *, fields: str = "", limit_s: float | None = None
    ) -> tuple[list[dict], str]:
        """Every object matching `selector` and the field selector `fields`, page by page, and
        the list's resourceVersion; with `limit_s`, best effort: the first page, one try."""
        items: list[dict] = []
        token = None
        while True:
            query = [("labelSelector", selector), ("fieldSelector", fields), ("continue", token)]
            query = [(k, v) for k, v in query if v] + [("limit", self.settings.list_page_size)]
            request = _Request("list", res, res.path(self.namespace), query=query, limit_s=limit_s)
            page = (await self._call(request)).json() or {}
            items += page.get("items") or []
            meta = page.get("metadata") or {}
            token = meta.get("continue")
            if not token or limit_s:
                return items, str(meta.get("resourceVersion") or "")

    async def pod_log(self, pod: str, container: str, lines: int, previous: bool = False) -> str:
        """The last `lines` lines a container wrote ('' if the pod is gone)."""
        query = [("container", container), ("tailLines", lines)]
        if previous:
            query.append(("previous", "true"))
        path = PODS.path(self.namespace, pod, "log")
        answer = await self._call(_Request("get", PODS, path, query=query, sub="log"), {404})
        return "" if answer.status == 404 else answer.body.decode(errors="replace")

    # -- requests, retries, errors --

    async def _call(self, request: "_Request", ok: set[int] | None = None) -> _Answer:
        """Send one request, retrying what may pass; statuses in `ok` are the caller's to read."""
        verb, res, sub = request.verb, request.res, request.sub
        tries = 1 if request.limit_s else self.settings.api_tries
        for attempt in range(tries):
            try:
                answer = await asyncio.to_thread(self._send, request)
            except (urllib3.exceptions.HTTPError, OSError) as exc:  # timeouts, resets, refusals
                problem, wait = f"{type(exc).__name__}: {exc}", None
            else:
                if 200 <= answer.status < 300 or answer.status in (ok or ()):
                    return answer
                if answer.status not in RETRIED:
                    raise self._error(verb, res, answer, sub)
                problem, wait = f"{answer.status} {answer.message()}", _retry_after(answer)
            if attempt + 1 < tries:
                delay = self.backoff(attempt, wait)
                self._log.warning(
                    "k8s_call_retried", verb=verb, resource=str(res), problem=problem, delay_s=delay
                )
                await asyncio.sleep(delay)
        raise RetryableError(
            f"the Kubernetes API did not {verb} {_what(res, sub)} after {tries} tries: {problem}",
            delay=self.settings.api_backoff_max_s,
        )

    def _send(self, request: "_Request") -> _Answer:
        """One request, in a worker thread. Returns any status; raises on transport errors."""
        response = self._open(request)
        try:
            return _Answer(response.status, response.headers, response.read())
        finally:
            response.release_conn()

    def _open(
        self, request: "_Request", timeout: tuple[float, float] | None = None
    ) -> urllib3.BaseHTTPResponse:
        """Send a request and return the unread urllib3 response (blocking)."""
        api = self._client
        if api is None:
            raise RuntimeError("KubeApi.connect() was not called")
        res, sub, body = request.res, request.sub, request.body
        with self._calls_lock:
            self.calls[(request.verb, res.group, f"{res.plural}/{sub}" if sub else res.plural)] += 1
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = request.content_type
        method, url, headers, data, post = api.param_serialize(
            method=_METHODS[request.verb],
            resource_path=request.path,
            query_params=request.query,
            header_params=headers,
            body=api.sanitize_for_serialization(body) if body is not None else None,
            auth_settings=["BearerToken"],
        )
        limit = request.limit_s or self.settings.api_timeout_s
        wait = timeout or (limit, limit)
        return api.call_api(method, url, headers, data, post, _request_timeout=wait).response

    def backoff(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before try `attempt` + 2: exponential with jitter, capped."""
        cap = self.settings.api_backoff_max_s
        if retry_after is not None:
            return min(cap, retry_after)
        return min(cap, self.settings.api_backoff_s * 2**attempt) * random.uniform(0.5, 1.0)

    def _error(self, verb: str, res: Resource, answer: _Answer, sub: str | None) -> ApiError:
        what, where = _what(res, sub), self.namespace
        if answer.status == 403:
            return ApiError(
                f"spinyard's service account may not {verb} {what} in {where}: "
                f"{answer.message()} (see the Role in k8s/base/rbac.yaml)",
                status=403,
                code=codes.FORBIDDEN,
            )
        if answer.status == 401:
            return ApiError(
                f"the Kubernetes API refused spinyard's credentials to {verb} {what}: "
                f"{answer.message()}",
                status=401,
                code=codes.UNAUTHORIZED,
            )
        hint = (
            f" (is there a namespace {where}, and does the cluster serve {what}?)"
            if answer.status == 404
            else ""
        )
        return ApiError(
            f"the Kubernetes API refused to {verb} {what} in {where}: "
            f"{answer.status} {answer.message()}{hint}",
            status=answer.status,
        )

    # -- watches --

    async def watch(
        self, res: Resource, selector: str, version: str
    ) -> AsyncIterator[tuple[str, dict]]:
        """The events of one watch request from `version`, as (type, object); a thread reads it.

        Types are ADDED, MODIFIED, DELETED and BOOKMARK. The iterator ends when
        the server ends the watch (its timeoutSeconds). Close it to stop early.

        Raises:
            Gone: `version` is too old (410): list again.
            ApiError: the API refuses the watch (403 and such).
            handlers.errors.RetryableError: the server failed, or the connection did.
        """
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        lock, state = threading.Lock(), {"response": None, "closed": False}
        query = [
            ("labelSelector", selector),
            ("watch", "true"),
            ("allowWatchBookmarks", "true"),
            ("resourceVersion", version),
            ("timeoutSeconds", self.settings.watch_timeout_s),
        ]
        timeout = (self.settings.api_timeout_s, self.settings.watch_timeout_s + _WATCH_SLACK_S)

        def put(item: tuple[str, Any]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody listens
                loop.call_soon_threadsafe(queue.put_nowait, item)

        def read() -> None:
            response = None
            try:
                path = res.path(self.namespace)
                response = self._open(_Request("watch", res, path, query=query), timeout)
                with lock:
                    state["response"] = response
                    closed = state["closed"]
                if closed:
                    return
                if response.status != 200:
                    put(("status", _Answer(response.status, response.headers, response.read())))
                    return
                for line in iter_resp_lines(response):
                    if line:
                        put(("event", json.loads(line)))
                put(("end", None))
            except BaseException as exc:  # handed to the loop, never raised in the thread
                put(("error", exc))
            finally:
                if response is not None:
                    with contextlib.suppress(Exception):
                        response.release_conn()

        thread = threading.Thread(target=read, name=f"k8s-watch-{res.plural}", daemon=True)
        thread.start()
        try:
            while True:
                kind, payload = await queue.get()
                if kind == "event":
                    yield _event(payload)
                elif kind == "end":
                    return
                elif kind == "error":
                    if state["closed"]:
                        return
                    if isinstance(payload, urllib3.exceptions.HTTPError | OSError | ValueError):
                        raise RetryableError(f"the watch failed: {payload!r}") from payload
                    raise payload
                else:  # an HTTP status other than 200
                    answer: _Answer = payload
                    if answer.status == 410:
                        raise Gone(answer.message())
                    if answer.status in RETRIED:
                        raise RetryableError(f"{answer.status} {answer.message()}")
                    raise self._error("watch", res, answer, None)
        finally:
            with lock:
                state["closed"] = True
                response = state["response"]
            if response is not None:
                with contextlib.suppress(Exception):
                    response.shutdown()  # unblocks the thread's read at once
            await _join(thread)


async def _join(thread: threading.Thread, limit_s: float = 5.0) -> None:
    """Wait (bounded) for a reader thread to finish, without blocking the loop."""
    if thread.is_alive():
        await asyncio.to_thread(thread.join, limit_s)


def _event(event: dict) -> tuple[str, dict]:
    """A watch event as (type, object); an ERROR event raised as what it means."""
    kind, obj = str(event.get("type")), event.get("object") or {}
    if kind == "ERROR":
        if obj.get("code") == 410:
            raise Gone(obj.get("message"))
        raise RetryableError(f"watch error: {obj.get('message')}")
    return kind, obj


def _what(res: Resource, sub: str | None) -> str:
    return f"{res.plural}/{sub}" if sub else str(res)


def _retry_after(answer: _Answer) -> float | None:
    try:
        return float(answer.headers.get("Retry-After"))
    except (TypeError, ValueError, AttributeError):
        return None
