"""A Kubernetes API server for tests and benches: kmock's emulator, made more like the real one.

kmock's `KubernetesEmulator` stores objects and serves create, get, list,
patch, delete and watch, but sets no uid, resourceVersion or
creationTimestamp, replays every object on every watch, ignores label
selectors and timeouts. `Apiserver` adds, as the real API server does:

- a uid, a creationTimestamp and a resourceVersion from one counter on every
  object, a fresh resourceVersion on every change (deletions included);
- label selectors (equality: `a=b`, `a==b`, `a!=b`) on lists and watches;
  a watch sees an object that stops matching as DELETED and one that starts
  matching as ADDED; field selectors on lists (Events' `involvedObject.*`,
  `reason`, ...; selectors.py), 400 for a field the kind has not;
- lists with the current resourceVersion and pages (limit / continue);
- watches that resume from a resourceVersion (replaying what happened since),
  answer 410 Gone for one older than the last `compact()`, end after their
  timeoutSeconds, and can be dropped by the test (`drop_watches()`);
- Secrets: `stringData` folded into base64 `data` on create and patch, as the server does;
- `fail(...)`: the next requests matching a verb and resource get an HTTP
  error, a Kubernetes Status, or no answer in time.

It overrides kmock internals (`_handle`, `_serve_*`, `_objects`, `_buses`,
`_lock`), which is why pyproject pins kmock. No controllers run here: see controllers.py.
"""

import asyncio
import base64
import collections
import contextlib
import datetime
import itertools
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import attrs
import kmock
from kubernetes import client

from dispatcher.backends.kubernetes import resources
from dispatcher.backends.kubernetes.resources import Resource
from kubesim.selectors import Selector, fields_selected, parse_fields, parse_selector, selected

NAMESPACE = "spinyard-apps"
RESOURCES = (
    resources.DEPLOYMENTS,
    resources.SERVICES,
    resources.INGRESSES,
    resources.INGRESSROUTES,
    resources.JOBS,
    resources.SECRETS,
    resources.PODS,
    resources.EVENTS,
)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ref(res: Resource) -> kmock.resource:
    """The kmock resource of one of the backend's resources."""
    return kmock.resource(res.group, res.version, res.plural)


@attrs.mutable(weakref_slot=True)
class _LoggedBus(kmock.Bus):
    """A watch bus that also keeps every event with its resourceVersion, for resumed watches,
    and each event's previous object (`previous`), for label selectors."""

    next_version: Any = None
    log: list = attrs.field(factory=list)
    _current: dict = attrs.field(factory=dict)  # (namespace, name) -> the object's last state

    async def put(self, *items: Any) -> None:
        for item in items:
            obj = item.get("object") or {}
            meta = obj.setdefault("metadata", {})
            if item.get("type") == "DELETED":  # a deletion is a change: it gets a version
                obj = item["object"] = {**obj, "metadata": {**meta}}
                obj["metadata"]["resourceVersion"] = str(self.next_version())
            key = (meta.get("namespace"), meta.get("name"))
            item["previous"] = self._current.get(key)
            if item.get("type") == "DELETED":
                self._current.pop(key, None)
            else:
                self._current[key] = obj
            self.log.append((int(obj["metadata"].get("resourceVersion") or 0), item))
        await super().put(*items)


@attrs.define(kw_only=True)
class Apiserver(kmock.KubernetesEmulator):
    """kmock's emulator with versions, uids, paging, resumable watches and injected failures."""

    compacted: int = 0
    remember_requests: bool = True  # False: forget each request once answered (benches)
    _versions: Any = attrs.field(factory=lambda: itertools.count(1))
    _version: int = 0
    _drops: dict = attrs.field(factory=dict)  # open watches: drop event -> request
    _held: asyncio.Event | None = None

    def __attrs_post_init__(self) -> None:
        self._buses = collections.defaultdict(lambda: _LoggedBus(next_version=self._next_version))
        super().__attrs_post_init__()
        for res in RESOURCES:
            self.resources[ref(res)] = {}

    def _next_version(self) -> int:
        self._version = next(self._versions)
        return self._version

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            if request.action == kmock.action.CREATE:
                meta = data.setdefault("metadata", {})
                meta["uid"] = str(uuid.uuid4())
                meta["creationTimestamp"] = now_rfc3339()
                meta["namespace"] = request.namespace or meta.get("namespace")
                meta["resourceVersion"] = str(self._next_version())
            elif request.action == kmock.action.UPDATE:
                data.setdefault("metadata", {})["resourceVersion"] = str(self._next_version())
            if request.resource == ref(resources.SECRETS):
                _fold_string_data(data)
        try:
            return await super()._handle(request)
        finally:
            # kmock matches each request against every one it has seen: O(n) per request.
            if not self.remember_requests:
                self._requests.remove(request)

    # kmock finds an object by scanning all of them; these look it up by its key instead.

    def _stored(self, request: kmock.Request, name: str | None = None) -> Any:
        key = (request.resource, request.namespace, name or request.name)
        found = self._objects[key] if key in self._objects else None
        if found is None or found.deleted:
            raise kmock.KubernetesObjectNotFoundError()
        return found

    async def _serve_fetch(self, request: kmock.Request) -> dict:
        return self._stored(request).raw

    async def _serve_create(self, request: kmock.Request) -> dict:
        return self._stored(request, (request.data.get("metadata") or {}).get("name")).raw

    async def _serve_update(self, request: kmock.Request) -> dict:
        return self._stored(request).last.raw

    async def _serve_delete(self, request: kmock.Request) -> dict:
        key = (request.resource, request.namespace, request.name)
        return self._objects[key].last.raw

    async def _serve_list(self, request: kmock.Request) -> Any:
        kind = next((r.kind for r in RESOURCES if ref(r) == request.resource), "")
        try:
            selector = parse_selector(request.params.get("labelSelector") or "")
            fields = parse_fields(request.params.get("fieldSelector") or "", kind)
        except ValueError as exc:
            return kmock.Response(status=400, payload=_status(400, "BadRequest", str(exc)))
        answer = await super()._serve_list(request)
        items = [
            obj
            for obj in answer["items"]
            if selected(obj, selector) and fields_selected(obj, fields, kind)
        ]
        start = int(request.params.get("continue") or 0)
        limit = int(request.params.get("limit") or 0) or len(items)
        answer["items"] = items[start : start + limit]
        answer["metadata"] = {"resourceVersion": str(self._version)}
        if start + limit < len(items):
            answer["metadata"]["continue"] = str(start + limit)
        return answer

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        drop = asyncio.Event()
        self._drops[drop] = request
        try:
            yield b""  # headers out: the stream has started
            async for event in self._events(request, drop):
                yield event
        finally:
            del self._drops[drop]

    async def _events(self, request: kmock.Request, drop: asyncio.Event) -> AsyncIterator[dict]:
        """A watch's events: what happened since its resourceVersion (or all that exists),
        then each change, until its timeoutSeconds or a drop."""
        while self._held is not None:
            await self._held.wait()
        since_text = request.params.get("resourceVersion") or ""
        since = int(since_text) if since_text.isdigit() else None
        if since is not None and since < self.compacted:
            yield {"type": "ERROR", "object": _status(410, "Expired", "too old resource version")}
            return
        try:
            selector = parse_selector(request.params.get("labelSelector") or "")
            if request.params.get("fieldSelector"):
                raise ValueError("field selectors on watches are not simulated")
        except ValueError as exc:
            yield {"type": "ERROR", "object": _status(400, "BadRequest", str(exc))}
            return
        bus = self._buses[request.resource]

        async with self._lock:  # no change can slip between the replay and the live part
            marker = await bus.mark()
            if since is None:
                replay = [
                    {"type": "ADDED", "object": obj.raw}
                    for (res, _, _), obj in self._objects.items()
                    if res == request.resource and not obj.deleted
                ]
            else:
                replay = [event for version, event in bus.log if version > since]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(request.params.get("timeoutSeconds") or 3600)
        stream = aiter(bus.stream(since=marker))
        try:
            for event in replay:
                if (found := _as_seen(event, request, selector)) is not None:
                    yield found
            while True:
                following = asyncio.ensure_future(anext(stream))
                following.add_done_callback(_quiet)
                dropped = asyncio.ensure_future(drop.wait())
                try:
                    await asyncio.wait(
                        {following, dropped},
                        timeout=max(0.0, deadline - loop.time()),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:  # also when the request is cancelled (the client went away)
                    dropped.cancel()
                    if not following.done():
                        following.cancel()
                if following.cancelled():  # dropped, or its time is up
                    return
                found = _as_seen(following.result(), request, selector)
                if found is not None:
                    yield found
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()
            with contextlib.suppress(Exception):
                await bus.unmark(marker)

    # -- for tests --

    def compact(self) -> None:
        """Forget history: watches resuming from an older resourceVersion get 410 Gone."""
        self.compacted = self._version + 1

    @contextlib.contextmanager
    def paused_watches(self) -> Iterator[None]:
        """Hold new watch requests until the block ends (a watch reconnecting waits)."""
        held = self._held = asyncio.Event()
        try:
            yield
        finally:
            self._held = None
            held.set()

    def drop_watches(self) -> None:
        """End every open watch, as a timeout or a lost connection would."""
        for drop in list(self._drops):
            drop.set()

    def open_watches(self, res: Resource, selector: bool = True) -> int:
        """How many watches of `res` are open (only those with a label selector: the backend's)."""
        return sum(
            1
            for drop, request in self._drops.items()
            if request.resource == ref(res)
            and ("labelSelector" in request.params) == selector
            and not drop.is_set()
        )

    def fail(
        self,
        verb: str,
        res: Resource,
        status: int = 500,
        *,
        times: int = 1,
        delay: float = 0.0,
        message: str = "injected",
        headers: dict[str, str] | None = None,
        subresource: str | None = None,
    ) -> None:
        """Answer the next `times` requests for `verb` on `res` with `status`, after `delay`.

        The emulator still applies a change it was asked for (a create that
        "failed" with 500 or timed out exists), as a real server may. Lists and
        watches without a label or field selector (the simulated controllers') pass.
        """
        action = {
            "create": kmock.action.CREATE,
            "get": kmock.action.FETCH,
            "list": kmock.action.LIST,
            "watch": kmock.action.WATCH,
            "patch": kmock.action.UPDATE,
            "delete": kmock.action.DELETE,
        }[verb]
        left = [times]

        async def react(request: kmock.Request) -> Any:
            if (
                left[0] <= 0
                or request.subresource != subresource
                or (
                    verb in ("list", "watch")
                    and not {"labelSelector", "fieldSelector"} & set(request.params)
                )
            ):
                raise NotImplementedError  # kmock: not for this reaction, serve it as usual
            left[0] -= 1
            if delay:
                await asyncio.sleep(delay)
            body = _status(status, {403: "Forbidden", 429: "TooManyRequests"}.get(status), message)
            return kmock.Response(status=status, headers=headers or {}, payload=body)

        self[action, ref(res)] << react

    def objects_of(self, res: Resource) -> dict[str, dict]:
        """The live objects of `res` in the namespace, by name."""
        return {
            name: obj.raw
            for (r, ns, name), obj in self.objects.items()
            if r == ref(res) and ns == NAMESPACE and not obj.deleted
        }


def _as_seen(event: dict, request: kmock.Request, selector: Selector) -> dict | None:
    """The event as one watch sees it; None if it is not for that watch.

    As the real API server does, a change that makes an object match the
    watch's label selector is ADDED, and one that makes it stop matching is
    DELETED (the last state that matched, at the change's resourceVersion).
    """
    obj, previous = event.get("object") or {}, event.get("previous")
    meta = obj.get("metadata") or {}
    if (request.namespace is not None and meta.get("namespace") != request.namespace) or (
        request.name is not None and meta.get("name") != request.name
    ):
        return None
    now, before = selected(obj, selector), selected(previous, selector)
    if event["type"] == "DELETED":
        return {"type": "DELETED", "object": obj} if now or before else None
    if now:
        return {"type": "MODIFIED" if before else "ADDED", "object": obj}
    if before:
        version = meta.get("resourceVersion")
        gone = {**previous, "metadata": {**previous["metadata"], "resourceVersion": version}}
        return {"type": "DELETED", "object": gone}
    return None


def _fold_string_data(secret: dict) -> None:
    """Move a Secret's (or a patch's) `stringData` into `data`, base64: it wins, key by key."""
    strings = secret.pop("stringData", None) or {}
    if strings:
        encoded = {k: base64.b64encode(str(v).encode()).decode() for k, v in strings.items()}
        secret["data"] = (secret.get("data") or {}) | encoded


def _quiet(task: asyncio.Future) -> None:
    """Retrieve a finished task's exception, so a cancelled watch's leftovers are not logged."""
    if not task.cancelled():
        task.exception()


def _status(code: int, reason: str | None, message: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "code": code,
        "reason": reason or "InternalError",
        "message": message,
    }


@contextlib.asynccontextmanager
async def apiserver(**options: Any) -> AsyncIterator[Apiserver]:
    """An `Apiserver` listening on a free loopback port."""
    async with Apiserver(**options) as server, kmock.Server(server):
        try:
            yield server
        finally:  # open watches would hold the server's shutdown for its grace period
            server._held = None
            server.drop_watches()


def configuration(server: Apiserver) -> client.Configuration:
    """Configuration of the official client for the emulator."""
    return client.Configuration(host=str(server.url).rstrip("/"))
