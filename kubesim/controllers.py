"""A Kubernetes API for tests: kmock's emulator, made a little more like the real thing,
and the controllers a test needs, simulated on top of it.

kmock's `KubernetesEmulator` stores objects and serves create, get, list,
patch, delete and watch, but sets no uid, resourceVersion or
creationTimestamp, replays every object on every watch, ignores label
selectors and timeouts, and runs no controllers. `Apiserver` adds, as the
real API server does:

- a uid, a creationTimestamp and a resourceVersion from one counter on every
  object, a fresh resourceVersion on every change (deletions included);
- lists with the current resourceVersion and pages (limit / continue);
- watches that resume from a resourceVersion (replaying what happened since),
  answer 410 Gone for one older than the last `compact()`, end after their
  timeoutSeconds, and can be dropped by the test (`drop_watches()`);
- `fail(...)`: the next requests matching a verb and resource get an HTTP
  error, a Kubernetes Status, or no answer in time.

Label selectors stay ignored (the backend filters on its side too).

`Cluster` plays the controllers and the kubelet over HTTP, so what it does
reaches the backend's watches like real changes: it gives each Deployment a
pod that becomes ready, crash-loops or never answers (chosen by the echo
app's arguments in the container command, as the local backend would run
it), gives each resumed Job a running pod that a test then completes, fails
or runs past its deadline, deletes what an owner owned when the owner goes
(the garbage collector), and serves pod logs.
"""

import asyncio
import collections
import contextlib
import datetime
import itertools
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import attrs
import kmock
from kmock._internal import aiobus, enums
from kubernetes import client

from dispatcher.backends.kubernetes import api as k8s_api

NAMESPACE = "spinyard-apps"
RESOURCES = (
    k8s_api.DEPLOYMENTS,
    k8s_api.SERVICES,
    k8s_api.INGRESSES,
    k8s_api.INGRESSROUTES,
    k8s_api.JOBS,
    k8s_api.SECRETS,
    k8s_api.PODS,
)


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def ref(res: k8s_api.Resource) -> kmock.resource:
    """The kmock resource of one of the backend's resources."""
    return kmock.resource(res.group, res.version, res.plural)


@attrs.mutable(weakref_slot=True)
class _LoggedBus(aiobus.Bus):
    """A watch bus that also keeps every event with its resourceVersion, for resumed watches."""

    next_version: Any = None
    log: list = attrs.field(factory=list)

    async def put(self, *items: Any) -> None:
        for item in items:
            obj = item.get("object") or {}
            meta = obj.setdefault("metadata", {})
            if item.get("type") == "DELETED":  # a deletion is a change: it gets a version
                obj = item["object"] = {**obj, "metadata": {**meta}}
                obj["metadata"]["resourceVersion"] = str(self.next_version())
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
            if request.action == enums.action.CREATE:
                meta = data.setdefault("metadata", {})
                meta["uid"] = str(uuid.uuid4())
                meta["creationTimestamp"] = now_rfc3339()
                meta["namespace"] = request.namespace or meta.get("namespace")
                meta["resourceVersion"] = str(self._next_version())
            elif request.action == enums.action.UPDATE:
                data.setdefault("metadata", {})["resourceVersion"] = str(self._next_version())
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

    async def _serve_list(self, request: kmock.Request) -> dict:
        answer = await super()._serve_list(request)
        items = answer["items"]
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
        bus = self._buses[request.resource]

        def ours(obj: dict) -> bool:
            meta = obj.get("metadata") or {}
            return (request.namespace is None or meta.get("namespace") == request.namespace) and (
                request.name is None or meta.get("name") == request.name
            )

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
                if ours(event["object"]):
                    yield event
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
                event = following.result()
                if ours(event.get("object") or {}):
                    yield event
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

    def open_watches(self, res: k8s_api.Resource, selector: bool = True) -> int:
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
        res: k8s_api.Resource,
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
        watches without a label selector (the simulated controllers') pass.
        """
        action = {
            "create": enums.action.CREATE,
            "get": enums.action.FETCH,
            "list": enums.action.LIST,
            "watch": enums.action.WATCH,
            "patch": enums.action.UPDATE,
            "delete": enums.action.DELETE,
        }[verb]
        left = [times]

        async def react(request: kmock.Request) -> Any:
            if (
                left[0] <= 0
                or request.subresource != subresource
                or (verb in ("list", "watch") and "labelSelector" not in request.params)
            ):
                raise NotImplementedError  # kmock: not for this reaction, serve it as usual
            left[0] -= 1
            if delay:
                await asyncio.sleep(delay)
            body = _status(status, {403: "Forbidden", 429: "TooManyRequests"}.get(status), message)
            return kmock.Response(status=status, headers=headers or {}, payload=body)

        self[action, ref(res)] << react

    def objects_of(self, res: k8s_api.Resource) -> dict[str, dict]:
        """The live objects of `res` in the namespace, by name."""
        return {
            name: obj.raw
            for (r, ns, name), obj in self.objects.items()
            if r == ref(res) and ns == NAMESPACE and not obj.deleted
        }


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


# -- controllers --


def behaviour(container: dict) -> tuple[str, int]:
    """How the simulated app behaves: (serve | exit | crash | hang | pull_error | unschedulable,
    exit code), from its SIM_BEHAVIOUR variable (`crash:3`), else from the echo app's
    arguments as the contract's specs give them (`--crash 3`: exit, `--delay`: hang).

    `exit` is a crash that Kubernetes has also given up on (its progress deadline
    compressed to nothing); `crash` only crash-loops, as the first minutes of a real one.
    """
    env = {e["name"]: e.get("value", "") for e in container.get("env") or []}
    if "SIM_BEHAVIOUR" in env:
        what, _, code = env["SIM_BEHAVIOUR"].partition(":")
        return what, int(code or 0)
    command = container.get("command") or []
    if "--crash" in command:
        return "exit", int(command[command.index("--crash") + 1])
    if "--delay" in command:
        return "hang", 0
    return "serve", 0


class Cluster:
    """The Deployment, Job and garbage controllers and the kubelet, simulated (see the top)."""

    def __init__(self, server: Apiserver) -> None:
        self.server = server
        self.logs: dict[str, str] = {}  # pod name -> its log
        self._tasks: list[asyncio.Task] = []
        self._runs: dict[str, asyncio.Task] = {}  # Job uid -> its simulated model
        self._pods_made: set[str] = set()
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Cluster":
        self._http = aiohttp.ClientSession(base_url=str(self.server.url))
        self.server["get", kmock.subresource("log")] << self._serve_log
        for res, react in (
            (k8s_api.DEPLOYMENTS, self._on_deployment),
            (k8s_api.JOBS, self._on_job),
        ):
            ready = asyncio.Event()
            task = asyncio.create_task(self._watch(res, react, ready), name=f"sim:{res.plural}")
            self._tasks.append(task)
            await asyncio.wait_for(ready.wait(), 5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        died = [t.exception() for t in self._tasks if t.done() and not t.cancelled()]
        tasks = self._tasks + list(self._runs.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._http.close()
        if died:  # a controller that died leaves tests waiting: say why
            raise RuntimeError("a simulated controller died") from died[0]

    def _serve_log(self, request: kmock.Request) -> bytes:
        return self.logs.get(request.name, f"{request.name}: no output\n").encode()

    async def _watch(self, res: k8s_api.Resource, react, ready: asyncio.Event) -> None:
        path = res.path(NAMESPACE)
        while True:
            timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
            async with self._http.get(path, params={"watch": "true"}, timeout=timeout) as resp:
                assert resp.status == 200, await resp.text()
                ready.set()
                async for line in resp.content:
                    event = json.loads(line) if line.strip() else {}
                    if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                        await react(event["type"], event["object"])

    async def request(self, method: str, path: str, body: Any = None) -> dict | None:
        """One API request; None if the object is gone (a test may stop what is simulated)."""
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with self._http.request(method, path, json=body, headers=headers) as resp:
            if resp.status == 404 and method in ("PATCH", "DELETE"):
                return None
            assert resp.status < 300, (method, path, resp.status, await resp.text())
            return await resp.json()

    async def patch_status(self, res: k8s_api.Resource, name: str, status: dict) -> None:
        await self.request("PATCH", res.path(NAMESPACE, name, "status"), {"status": status})

    # Deployments: one pod each, whose fate the echo app's arguments decide.

    async def _on_deployment(self, kind: str, dep: dict) -> None:
        if "template" not in (dep.get("spec") or {}):
            return  # not one a test cares about running
        uid = dep["metadata"]["uid"]
        if kind == "DELETED":
            await self._collect_garbage(uid)
            return
        if uid in self._pods_made:
            return
        self._pods_made.add(uid)
        name = dep["metadata"]["name"]
        pod = await self._make_pod(dep, f"{name}-{uid[:5]}")
        container = dep["spec"]["template"]["spec"]["containers"][0]
        what, code = behaviour(container)
        pod_name = pod["metadata"]["name"]
        if what == "exit":  # compressed time: Kubernetes gives up at once
            await self.patch_status(k8s_api.DEPLOYMENTS, name, _deployment_failed())
            await self._crash(pod_name, code)
        elif what == "crash":
            await self._crash(pod_name, code)
        elif what == "pull_error":
            await self.patch_status(k8s_api.PODS, pod_name, _pod_waiting("app", "ImagePullBackOff"))
        elif what == "unschedulable":
            await self.patch_status(k8s_api.PODS, pod_name, _pod_unschedulable())
        else:
            ready = what == "serve"
            await self.patch_status(k8s_api.PODS, pod_name, _pod_running("app", ready))
            if ready:
                await self.patch_status(k8s_api.DEPLOYMENTS, name, _deployment_ready())

    async def _crash(self, pod: str, code: int) -> None:
        self.logs.setdefault(pod, f"starting\nboom: exiting with {code}\n")
        await self.patch_status(k8s_api.PODS, pod, _pod_crashlooping("app", code))

    async def _make_pod(self, owner: dict, name: str) -> dict:
        template = owner["spec"]["template"]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "labels": dict(template["metadata"]["labels"]),
                "ownerReferences": [
                    {
                        "apiVersion": owner["apiVersion"],
                        "kind": owner["kind"],
                        "name": owner["metadata"]["name"],
                        "uid": owner["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": template["spec"],
            "status": {
                "phase": "Pending",
                "conditions": [_condition("PodScheduled", "True")],
            },
        }
        return await self.request("POST", k8s_api.PODS.path(NAMESPACE), pod)

    async def _collect_garbage(self, owner_uid: str) -> None:
        for res in (k8s_api.PODS, k8s_api.SERVICES, k8s_api.INGRESSES, k8s_api.INGRESSROUTES,
                    k8s_api.SECRETS):  # fmt: skip
            for name, obj in self.server.objects_of(res).items():
                owners = obj["metadata"].get("ownerReferences") or []
                if any(o.get("uid") == owner_uid for o in owners):
                    async with self._http.delete(res.path(NAMESPACE, name)):
                        pass

    # Jobs: a running pod once resumed. The contract's job model (tests/apps/job_model.py)
    # then ends as its arguments say, or at the Job's deadline; any other command runs
    # until a test ends it (finish_job, expire_job).

    async def _on_job(self, kind: str, job: dict) -> None:
        uid = job["metadata"]["uid"]
        if kind == "DELETED":
            if uid in self._runs:
                self._runs.pop(uid).cancel()
            await self._collect_garbage(uid)
            return
        if job["spec"].get("suspend") or uid in self._pods_made:
            return
        self._pods_made.add(uid)
        name = job["metadata"]["name"]
        pod = await self._make_pod(job, f"{name}-{uid[:5]}")
        running = {"active": 1, "ready": 1, "startTime": now_rfc3339()}
        await self.patch_status(k8s_api.JOBS, name, running)
        await self.patch_status(k8s_api.PODS, pod["metadata"]["name"], _pod_running("job", True))
        command = job["spec"]["template"]["spec"]["containers"][0].get("command") or []
        if any(arg.endswith("job_model.py") for arg in command):
            deadline = float(job["spec"].get("activeDeadlineSeconds") or 3600)
            run = self._run_model(name, command, deadline)
            self._runs[uid] = asyncio.create_task(run, name=f"sim:run:{name}")

    async def _run_model(self, job_id: str, command: list[str], deadline_s: float) -> None:
        """The job model's run as its arguments say, stopped at the deadline like Kubernetes."""

        def arg(flag: str, default: float) -> float:
            return float(command[command.index(flag) + 1]) if flag in command else default

        code, sleep = int(arg("--exit", 0)), arg("--sleep", 0)
        log = 'job_model: {"inputs": "..."}\n'
        if sleep:
            log += "job_model: sleeping\n"
        await asyncio.sleep(min(sleep, deadline_s))
        if sleep >= deadline_s:
            await self.expire_job(job_id, log=log)
        elif code:
            await self.finish_job(job_id, code, log=log + f"job_model: failing with {code}\n")
        else:
            await self.finish_job(job_id, 0, log=log)

    def job_pod(self, job_id: str) -> str | None:
        """The name of the run's pod; None once it is gone."""
        pods = [
            name
            for name, pod in self.server.objects_of(k8s_api.PODS).items()
            if pod["metadata"]["labels"].get("spinyard.io/instance") == job_id
        ]
        assert len(pods) <= 1, pods
        return pods[0] if pods else None

    async def finish_job(self, job_id: str, exit_code: int = 0, log: str | None = None) -> None:
        """The run's container exits with `exit_code`; the Job completes or fails."""
        if exit_code == 0:
            ends = [_condition("SuccessCriteriaMet", "True"), _condition("Complete", "True")]
        else:
            limit = "Job has reached the specified backoff limit"
            ends = [_condition("Failed", "True", "BackoffLimitExceeded", limit)]
        await self._end_job(job_id, exit_code, ends, log)

    async def expire_job(self, job_id: str, log: str | None = None) -> None:
        """The run passes its activeDeadlineSeconds: its pod is killed (143), the Job fails."""
        deadline = "Job was active longer than specified deadline"
        await self._end_job(
            job_id, 143, [_condition("Failed", "True", "DeadlineExceeded", deadline)], log
        )

    async def _end_job(self, job_id: str, code: int, ends: list[dict], log: str | None) -> None:
        pod = self.job_pod(job_id)
        if pod is None:
            return  # the run was cancelled meanwhile
        if log is not None:
            self.logs[pod] = log
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}
        status = {
            "name": "job",
            "ready": False,
            "restartCount": 0,
            "state": {"terminated": terminated},
        }
        phase = "Succeeded" if code == 0 else "Failed"
        await self.patch_status(k8s_api.PODS, pod, {"phase": phase, "containerStatuses": [status]})
        counts = {"succeeded": 1} if code == 0 else {"failed": 1}
        await self.patch_status(k8s_api.JOBS, job_id, {"active": 0, **counts, "conditions": ends})

    def running_pods(self, instance_id: str) -> int:
        """Pods of the instance that run and whose owner still exists (so GC is instant)."""
        owners = {
            obj["metadata"]["uid"]
            for res in (k8s_api.DEPLOYMENTS, k8s_api.JOBS)
            for obj in self.server.objects_of(res).values()
        }
        return sum(
            1
            for pod in self.server.objects_of(k8s_api.PODS).values()
            if pod["metadata"]["labels"].get("spinyard.io/instance") == instance_id
            and (pod.get("status") or {}).get("phase") == "Running"
            and any(o["uid"] in owners for o in pod["metadata"].get("ownerReferences") or [])
        )


def _condition(kind: str, status: str, reason: str | None = None, message: str = "") -> dict:
    found = {"type": kind, "status": status, "lastTransitionTime": now_rfc3339()}
    if reason:
        found |= {"reason": reason, "message": message}
    return found


def _pod_running(container: str, ready: bool) -> dict:
    flag = "True" if ready else "False"
    return {
        "phase": "Running",
        "conditions": [
            _condition("PodScheduled", "True"),
            _condition("Initialized", "True"),
            _condition("ContainersReady", flag),
            _condition("Ready", flag),
        ],
        "containerStatuses": [
            {
                "name": container,
                "ready": ready,
                "restartCount": 0,
                "started": True,
                "state": {"running": {"startedAt": now_rfc3339()}},
            }
        ],
    }


def _pod_crashlooping(container: str, code: int) -> dict:
    return {
        "phase": "Running",
        "conditions": [_condition("PodScheduled", "True"), _condition("Ready", "False")],
        "containerStatuses": [
            {
                "name": container,
                "ready": False,
                "restartCount": 1,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
                "lastState": {"terminated": {"exitCode": code, "reason": "Error"}},
            }
        ],
    }


def _pod_waiting(container: str, reason: str) -> dict:
    return {
        "phase": "Pending",
        "conditions": [_condition("PodScheduled", "True"), _condition("Ready", "False")],
        "containerStatuses": [
            {
                "name": container,
                "ready": False,
                "restartCount": 0,
                "state": {"waiting": {"reason": reason, "message": f"simulated {reason}"}},
            }
        ],
    }


def _pod_unschedulable() -> dict:
    message = "0/3 nodes are available: 3 Insufficient cpu."
    return {
        "phase": "Pending",
        "conditions": [_condition("PodScheduled", "False", "Unschedulable", message)],
    }


def _deployment_ready() -> dict:
    return {
        "replicas": 1,
        "readyReplicas": 1,
        "availableReplicas": 1,
        "updatedReplicas": 1,
        "conditions": [
            _condition("Available", "True", "MinimumReplicasAvailable"),
            _condition("Progressing", "True", "NewReplicaSetAvailable"),
        ],
    }


def _deployment_failed() -> dict:
    return {
        "replicas": 1,
        "unavailableReplicas": 1,
        "conditions": [
            _condition("Available", "False", "MinimumReplicasUnavailable"),
            _condition(
                "Progressing", "False", "ProgressDeadlineExceeded", "ReplicaSet has timed out"
            ),
        ],
    }
