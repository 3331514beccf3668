"""One informer per watched kind: the objects spinyard manages, kept current by list and watch.

An `Informer` lists one resource with spinyard's label selector, then
watches it from the list's resourceVersion, for ever: a watch that ends (its
timeoutSeconds, a dropped connection) is resumed from the last
resourceVersion seen, one answered 410 Gone lists again, and what the new
list no longer holds is reported deleted. Refusals (403 and such) and
failures are retried with the API's bounded backoff. Its cache holds the
objects by name; handlers registered with `on()` hear of each change, in the
event loop. Nothing here knows a kind: the backend registers what Deployments,
Pods and Jobs mean. Learned from dask-gateway's Kubernetes backend
(`backends/kubernetes/utils.py`, `Informer`). Requests go through `KubeApi`.
"""

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from dispatcher import logs
from dispatcher.backends.kubernetes.api import ApiError, Gone, KubeApi
from dispatcher.backends.kubernetes.resources import Resource
from handlers.errors import PermanentError, RetryableError

Changed = Callable[[dict], None]
Failed = Callable[[PermanentError], None]
_MAX_BACKOFF_STEP = 10  # failures past this many wait no longer (the backoff is capped anyway)


@dataclass(frozen=True)
class _Handler:
    update: Changed
    delete: Changed
    error: Failed | None


class Informer:
    """A cache of one resource's objects (by name), kept current by a list + watch task."""

    def __init__(self, api: KubeApi, res: Resource, selector: str) -> None:
        """
        Args:
            api: the API client (connected before `start()`).
            res: the resource to watch.
            selector: the label selector the server applies to the list and the watch.
        """
        self.res = res
        self.cache: dict[str, dict] = {}
        self.error: PermanentError | None = None  # why the API refuses, until it answers again
        self.synced = asyncio.Event()  # the first list arrived, or the API refused it
        self._api = api
        self._selector = selector
        self._handlers: list[_Handler] = []
        self._task: asyncio.Task | None = None
        self._log = logs.get("spinyard.backend.kubernetes")

    def on(self, update: Changed, delete: Changed, error: Failed | None = None) -> None:
        """Call `update(obj)` for each object added or changed, `delete(obj)` for each gone,
        and `error(exc)` when the API refuses or the informer dies."""
        self._handlers.append(_Handler(update, delete, error))

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        """Start listing and watching, unless running (a died informer starts afresh)."""
        if self._task is None:
            self.synced = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name=f"k8s-informer:{self.res.plural}")
            self._task.add_done_callback(self._ended)

    async def until_synced(self) -> None:
        """Start if needed; return once the objects are listed.

        Raises:
            handlers.errors.PermanentError: the API refused the list or the watch
                (an `ApiError`, e.g. 403), or the informer died.
        """
        self.start()
        synced = self.synced  # a restart makes a new one; this wait is on this run's
        await synced.wait()
        if self.error is not None:
            raise self.error

    async def stop(self) -> None:
        """Cancel the task; the cache stays as it was."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def note(self, obj: dict) -> None:
        """An object an API call just returned: newer than the cache, if there is one."""
        if self._task is not None:
            self._changed("MODIFIED", obj)

    async def _run(self) -> None:
        version: str | None = None
        failures = 0
        loop = asyncio.get_running_loop()
        while True:
            try:
                if version is None:
                    items, version = await self._api.list(self.res, self._selector)
                    self._relisted(items)
                started, seen = loop.time(), 0
                events = self._api.watch(self.res, self._selector, version)
                async with contextlib.aclosing(events):
                    async for kind, obj in events:
                        seen += 1
                        version = (obj.get("metadata") or {}).get("resourceVersion") or version
                        failures = 0
                        if kind != "BOOKMARK":
                            self._changed(kind, obj)
                if not seen and loop.time() - started < 1.0:
                    raise RetryableError("the watch ended at once")
            except Gone:
                self._log.info("k8s_watch_relisted", resource=str(self.res))
                version = None
                continue
            except ApiError as exc:
                self._failed(exc)
                failures += 1
                self._log.warning("k8s_watch_refused", resource=str(self.res), error=exc.message)
            except RetryableError as exc:
                failures += 1
                self._log.warning("k8s_watch_dropped", resource=str(self.res), error=str(exc))
            else:
                continue  # the server ended the watch: resume at once from `version`
            await asyncio.sleep(self._api.backoff(min(failures, _MAX_BACKOFF_STEP)))

    def _relisted(self, items: list[dict]) -> None:
        """A (re)list: what it no longer holds is gone, the rest is current."""
        listed = {_name(obj) for obj in items}
        for name in self.cache.keys() - listed:
            self._changed("DELETED", self.cache[name])
        for obj in items:
            self._changed("ADDED", obj)
        self.error = None
        self.synced.set()

    def _changed(self, kind: str, obj: dict) -> None:
        name = _name(obj)
        if name is None:
            return
        self.error = None
        if kind == "DELETED":
            self.cache.pop(name, None)
        else:
            self.cache[name] = obj
        for handler in self._handlers:
            (handler.delete if kind == "DELETED" else handler.update)(obj)

    def _failed(self, exc: PermanentError) -> None:
        self.error = exc
        self.synced.set()
        for handler in self._handlers:
            if handler.error is not None:
                handler.error(exc)

    def _ended(self, task: asyncio.Task) -> None:
        """The task ends only when cancelled; if it died, fail its waiters (`start` restarts)."""
        if self._task is task:
            self._task = None
        if task.cancelled() or task.exception() is None:
            return
        error = repr(task.exception())
        self._log.error("k8s_watch_died", resource=str(self.res), error=error)
        self._failed(PermanentError(f"watching {self.res} failed: {error}"))


async def synced(*informers: Informer) -> None:
    """Start the informers not yet running; return once each has listed its objects.

    Raises:
        handlers.errors.PermanentError: the API refused one of them, or one died.
    """
    for informer in informers:
        informer.start()
    for informer in informers:
        await informer.until_synced()


def _name(obj: dict) -> str | None:
    return (obj.get("metadata") or {}).get("name")
