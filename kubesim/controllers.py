"""The controllers a test needs, simulated over HTTP on the API server emulator (apiserver.py).

`Cluster` plays the Deployment and Job controllers, the garbage collector
and the kubelet over HTTP, so what it does reaches the backend's watches
like real changes: it gives each Deployment a pod that becomes ready,
crash-loops or never answers (chosen by the echo app's arguments in the
container command, as the local backend would run it, or by a
SIM_BEHAVIOUR variable; with SIM_PROBE, kubelet also reports the readiness
probe's answer as an Event, see kubelet_events.py), gives each resumed Job
a running pod that a test then completes, fails or runs past its deadline
(the contract's job model ends as its arguments say), deletes what an owner
owned when the owner goes, and serves pod logs. As the kubelet does, it
fills each container's environment (`envs`, by pod; kubelet_env.py), and a
`secretKeyRef` to a Secret or key that is not there leaves the pod waiting
in CreateContainerConfigError. A bare pod (no owner: a warm runner) really
runs, as a local process at a loopback pod IP (processes.py). Its watches
send no label selector, so `Apiserver.fail` passes them by.
"""

import asyncio
import json
from typing import Any

import aiohttp
import kmock

from dispatcher.backends.kubernetes.resources import (
    DEPLOYMENTS,
    EVENTS,
    INGRESSES,
    INGRESSROUTES,
    JOBS,
    PODS,
    SECRETS,
    SERVICES,
    Resource,
)
from kubesim import kubelet_env, kubelet_events
from kubesim.apiserver import NAMESPACE, Apiserver, now_rfc3339
from kubesim.processes import ProcessKubelet
from kubesim.statuses import (
    condition,
    deployment_failed,
    deployment_ready,
    pod_crashlooping,
    pod_running,
    pod_unschedulable,
    pod_waiting,
)


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
    """The Deployment, Job and garbage controllers and the kubelet, simulated (see the top).

    Use it as an async context manager around the test: it watches from the start
    and raises on exit if one of its controllers died.
    """

    def __init__(self, server: Apiserver) -> None:
        self.server = server
        self.logs: dict[str, str] = {}  # pod name -> its log
        self.envs: dict[str, dict[str, str]] = {}  # pod name -> its container's environment
        self.node = ProcessKubelet(self.patch_status, lambda: server.objects_of(SECRETS))
        self._tasks: list[asyncio.Task] = []
        self._runs: dict[str, asyncio.Task] = {}  # Job uid -> its simulated model
        self._pods_made: set[str] = set()
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Cluster":
        self._http = aiohttp.ClientSession(base_url=str(self.server.url))
        self.server["get", kmock.subresource("log")] << self._serve_log
        for res, react in (
            (DEPLOYMENTS, self._on_deployment),
            (JOBS, self._on_job),
            (PODS, self.node.on_pod),
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
        await self.node.close()
        await self._http.close()
        if died:  # a controller that died leaves tests waiting: say why
            raise RuntimeError("a simulated controller died") from died[0]

    def _serve_log(self, request: kmock.Request) -> bytes:
        log = self.node.log(request.name)
        return (log or self.logs.get(request.name, f"{request.name}: no output\n")).encode()

    async def _watch(self, res: Resource, react, ready: asyncio.Event) -> None:
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

    async def patch_status(self, res: Resource, name: str, status: dict) -> None:
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
        if not await self._fill_env(pod_name, container):
            return
        if what == "exit":  # compressed time: Kubernetes gives up at once
            await self.patch_status(DEPLOYMENTS, name, deployment_failed())
            await self._crash(pod_name, code)
        elif what == "crash":
            await self._crash(pod_name, code)
        elif what == "pull_error":
            await self.patch_status(PODS, pod_name, pod_waiting("app", "ImagePullBackOff"))
        elif what == "unschedulable":
            await self.patch_status(PODS, pod_name, pod_unschedulable())
        else:
            ready = what == "serve"
            await self.patch_status(PODS, pod_name, pod_running("app", ready))
            if ready:
                await self.patch_status(DEPLOYMENTS, name, deployment_ready())
        if (answer := kubelet_events.probe_answer(container)) is not None:
            await self.probe_failed(pod, answer)

    async def _fill_env(self, pod: str, container: dict) -> bool:
        """The container's environment into `envs` (kubelet_env.py); False, and the pod left
        waiting, if a secret it refers to is not there."""
        secrets = self.server.objects_of(SECRETS)
        env, problem = kubelet_env.container_env(container, secrets, NAMESPACE)
        if problem:
            waiting = pod_waiting(container["name"], kubelet_env.REASON, problem)
            await self.patch_status(PODS, pod, waiting)
            return False
        self.envs[pod] = env
        return True

    async def probe_failed(self, pod: dict, answer: str, **when) -> None:
        """The kubelet reports that the app's readiness probe got `answer` (an Event)."""
        container = pod["spec"]["containers"][0]
        event = kubelet_events.unhealthy(pod, container, answer, **when)
        await self.request("POST", EVENTS.path(NAMESPACE), event)

    async def _crash(self, pod: str, code: int) -> None:
        self.logs.setdefault(pod, f"starting\nboom: exiting with {code}\n")
        await self.patch_status(PODS, pod, pod_crashlooping("app", code))

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
                "conditions": [condition("PodScheduled", "True")],
            },
        }
        return await self.request("POST", PODS.path(NAMESPACE), pod)

    async def _collect_garbage(self, owner_uid: str) -> None:
        for res in (PODS, SERVICES, INGRESSES, INGRESSROUTES, SECRETS):
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
        container = job["spec"]["template"]["spec"]["containers"][0]
        if not await self._fill_env(pod["metadata"]["name"], container):
            return
        # The pod runs first, then the Job counts it (ready), as on a cluster: whoever
        # sees the Job active finds its pod running.
        await self.patch_status(PODS, pod["metadata"]["name"], pod_running("job", True))
        running = {"active": 1, "ready": 1, "startTime": now_rfc3339()}
        await self.patch_status(JOBS, name, running)
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
            for name, pod in self.server.objects_of(PODS).items()
            if pod["metadata"]["labels"].get("spinyard.io/instance") == job_id
        ]
        assert len(pods) <= 1, pods
        return pods[0] if pods else None

    async def finish_job(self, job_id: str, exit_code: int = 0, log: str | None = None) -> None:
        """The run's container exits with `exit_code`; the Job completes or fails."""
        if exit_code == 0:
            ends = [condition("SuccessCriteriaMet", "True"), condition("Complete", "True")]
        else:
            limit = "Job has reached the specified backoff limit"
            ends = [condition("Failed", "True", "BackoffLimitExceeded", limit)]
        await self._end_job(job_id, exit_code, ends, log)

    async def expire_job(self, job_id: str, log: str | None = None) -> None:
        """The run passes its activeDeadlineSeconds: its pod is killed (143), the Job fails."""
        deadline = "Job was active longer than specified deadline"
        await self._end_job(
            job_id, 143, [condition("Failed", "True", "DeadlineExceeded", deadline)], log
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
        await self.patch_status(PODS, pod, {"phase": phase, "containerStatuses": [status]})
        counts = {"succeeded": 1} if code == 0 else {"failed": 1}
        await self.patch_status(JOBS, job_id, {"active": 0, **counts, "conditions": ends})

    def running_pods(self, instance_id: str) -> int:
        """Pods of the instance that run and whose owner still exists (so GC is instant),
        and bare pods whose process runs."""
        owners = {
            obj["metadata"]["uid"]
            for res in (DEPLOYMENTS, JOBS)
            for obj in self.server.objects_of(res).values()
        }
        return sum(
            1
            for pod in self.server.objects_of(PODS).values()
            if pod["metadata"]["labels"].get("spinyard.io/instance") == instance_id
            and (pod.get("status") or {}).get("phase") == "Running"
            and (
                any(o["uid"] in owners for o in pod["metadata"].get("ownerReferences") or [])
                or self.node.running(pod["metadata"]["name"])
            )
        )
