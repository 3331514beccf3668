"""The simulated kubelet's real half: bare pods run as local processes, at loopback pod IPs.

A pod created with no owner (spinyard's warm runners are the only such pods)
is not simulated from its arguments like a Deployment's or a Job's: its
container's command really runs, here, as a process in a session of its own,
so what it serves and uploads is real. As a node would:

- each pod gets an IP of its own, `127.<n>.<i>.<j>` (Linux routes all of
  127/8 to loopback; `<n>` is random per cluster, so clusters in parallel test
  processes rarely meet), reported as `status.podIP` and given to the
  container through the downward API (`valueFrom.fieldRef: status.podIP`);
- `python` is this interpreter (a `python` first on the process's PATH);
  the environment is the container's `env` and that PATH, nothing of this
  process's; stdout and stderr are the pod's log, which `Cluster` serves;
- `secretKeyRef` variables are read from their Secrets as the kubelet does
  (kubelet_env.py): one that is not there leaves the pod waiting in
  CreateContainerConfigError, not started;
- the readiness probe (httpGet) is asked every 50 ms at the pod IP; the pod
  is Ready once it answers 200-399;
- when the process exits the pod is Succeeded (exit code 0) or Failed, with
  the container's exit code; `spec.activeDeadlineSeconds` counted from its
  start stops it (SIGTERM, SIGKILL after a second) and fails it with reason
  DeadlineExceeded; a pod deleted is stopped the same way.
"""

import asyncio
import contextlib
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

from dispatcher.backends.kubernetes.resources import PODS
from dispatcher.backends.local.processes import descendants
from kubesim import kubelet_env
from kubesim.apiserver import NAMESPACE, now_rfc3339
from kubesim.statuses import condition, pod_waiting

Patch = Callable[..., Awaitable[None]]
PROBE_S = 0.05
STOP_GRACE_S = 1.0


class _Running:
    def __init__(
        self, popen: asyncio.subprocess.Process, ip: str, log: Path, container: str
    ) -> None:
        self.popen, self.ip, self.log, self.container = popen, ip, log, container
        self.started, self.started_at = time.time(), now_rfc3339()
        self.task: asyncio.Task | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.why: str | None = None  # "DeadlineExceeded" once stopped at its deadline
        self.stopping: asyncio.Task | None = None
        self.exited = asyncio.ensure_future(popen.wait())  # its exit code, once it exits


class ProcessKubelet:
    """Runs bare pods as local processes (see the top); `patch_status(res, name, status)` is the
    cluster's."""

    def __init__(self, patch_status: Patch, secrets: Callable[[], dict[str, dict]]) -> None:
        self._patch, self._secrets = patch_status, secrets
        self._root = Path(tempfile.mkdtemp(prefix="kubesim-node-"))
        (self._root / "bin").mkdir()
        (self._root / "bin" / "python").symlink_to(sys.executable)
        self._subnet = random.randrange(16, 250)
        self._next = itertools.count(2)
        self._pods: dict[str, _Running] = {}
        self._http: aiohttp.ClientSession | None = None

    def log(self, name: str) -> str | None:
        """The pod's log so far, if it is one of these."""
        running = self._pods.get(name)
        return running.log.read_text(errors="replace") if running else None

    async def on_pod(self, kind: str, pod: dict) -> None:
        meta = pod["metadata"]
        name = meta["name"]
        if kind == "DELETED":
            running = self._pods.get(name)
            if running is not None:
                await _stop(running)
            return
        if meta.get("ownerReferences"):
            return  # a controller's pod: simulated by `Cluster`
        running = self._pods.get(name)
        if running is None and kind == "ADDED":
            await self._start(pod)
        elif running is not None and running.deadline is None:
            limit = (pod.get("spec") or {}).get("activeDeadlineSeconds")
            if limit:
                left = running.started + float(limit) - time.time()
                loop = asyncio.get_running_loop()
                running.deadline = loop.call_later(max(0.0, left), self._expire, name)

    def _expire(self, name: str) -> None:
        running = self._pods[name]
        if running.popen.returncode is None:
            running.why = "DeadlineExceeded"
            running.stopping = asyncio.create_task(_stop(running), name=f"sim:stop:{name}")

    async def _start(self, pod: dict) -> None:
        name = pod["metadata"]["name"]
        n = next(self._next)
        ip = f"127.{self._subnet}.{n // 250}.{n % 250 + 1}"
        container = pod["spec"]["containers"][0]
        filled, problem = kubelet_env.container_env(container, self._secrets(), NAMESPACE)
        if problem:
            await self._patch(
                PODS, name, pod_waiting(container["name"], kubelet_env.REASON, problem)
            )
            return
        env = {"PATH": f"{self._root / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}", **filled}
        for var in container.get("env") or []:
            field = ((var.get("valueFrom") or {}).get("fieldRef") or {}).get("fieldPath")
            if field in ("status.podIP", "metadata.name"):
                env[var["name"]] = ip if field == "status.podIP" else name
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        log = self._root / f"{name}.log"
        cwd = container.get("workingDir") or str(self._root)
        popen = await _spawn(argv, env, cwd, log)
        running = self._pods[name] = _Running(popen, ip, log, container["name"])
        await self._patch(PODS, name, _running(running, ready=False))
        running.task = asyncio.create_task(self._run(name, container), name=f"sim:pod:{name}")

    async def _run(self, name: str, container: dict) -> None:
        """Probe the pod until it is ready, then wait for its process; report how it ended."""
        running = self._pods[name]
        probe = (container.get("readinessProbe") or {}).get("httpGet")
        ready = probe is None
        if ready:
            await self._patch(PODS, name, _running(running, ready=True))
        while not ready and running.popen.returncode is None:
            if await self._probe(running.ip, probe, container):
                ready = True
                await self._patch(PODS, name, _running(running, ready=True))
            else:
                await asyncio.wait({running.exited}, timeout=PROBE_S)
        code = await running.exited
        code = code if code >= 0 else 128 - code
        await self._patch(PODS, name, _ended(running.container, code, running.why))

    async def _probe(self, ip: str, probe: dict, container: dict) -> bool:
        port = probe.get("port")
        if isinstance(port, str):
            port = next(p["containerPort"] for p in container["ports"] if p.get("name") == port)
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1))
        try:
            async with self._http.get(f"http://{ip}:{port}{probe.get('path', '/')}") as resp:
                return 200 <= resp.status < 400
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def close(self) -> None:
        """Stop every process left and forget the node's files."""
        for running in self._pods.values():
            if running.deadline is not None:
                running.deadline.cancel()
            await _stop(running)
        tasks = [r.task for r in self._pods.values() if r.task is not None]
        tasks += [r.stopping for r in self._pods.values() if r.stopping is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
        shutil.rmtree(self._root, ignore_errors=True)

    def running(self, name: str) -> bool:
        """Whether the pod's process still runs."""
        found = self._pods.get(name)
        return found is not None and found.popen.returncode is None


async def _spawn(
    argv: list[str], env: dict[str, str], cwd: str, log: Path
) -> asyncio.subprocess.Process:
    """The container's process, in a session of its own, its output to the pod's log."""
    with open(log, "wb") as out:  # noqa: ASYNC230 - a new local file: no wait worth a thread
        return await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


async def _stop(running: _Running) -> None:
    """SIGTERM to the pod's process group, SIGKILL after the grace; wait for it. Whatever
    it started, in any session, gets the SIGKILL too, as a container's cgroup would."""
    pid = running.popen.pid
    left = descendants(pid)
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 5.0)):
        if running.exited.done() and sig == signal.SIGTERM:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        await asyncio.wait({running.exited}, timeout=wait_s)
        left += descendants(pid)
    for child in set(left):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signal.SIGKILL)


def _running(running: _Running, *, ready: bool) -> dict:
    flag = "True" if ready else "False"
    return {
        "phase": "Running",
        "podIP": running.ip,
        "podIPs": [{"ip": running.ip}],
        "startTime": running.started_at,
        "conditions": [
            condition("PodScheduled", "True"),
            condition("Initialized", "True"),
            condition("ContainersReady", flag),
            condition("Ready", flag),
        ],
        "containerStatuses": [
            {
                "name": running.container,
                "ready": ready,
                "restartCount": 0,
                "started": True,
                "state": {"running": {"startedAt": running.started_at}},
            }
        ],
    }


def _ended(container: str, code: int, why: str | None) -> dict:
    terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}
    found = {
        "phase": "Succeeded" if code == 0 and why is None else "Failed",
        "conditions": [condition("Ready", "False")],
        "containerStatuses": [
            {
                "name": container,
                "ready": False,
                "restartCount": 0,
                "state": {"terminated": terminated},
            }
        ],
    }
    if why == "DeadlineExceeded":
        found |= {
            "reason": why,
            "message": "Pod was active on the node longer than the specified deadline",
        }
    return found
