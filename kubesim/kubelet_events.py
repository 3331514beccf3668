"""The Events the simulated kubelet reports about a pod's readiness probe, worded as kubelet's.

A real kubelet tells a failed probe's answer only in an Event of the pod
(type Warning, reason Unhealthy, core v1), which the backend reads when a
start fails. `unhealthy` builds one, with the message kubelet would write for
the answer a test names: `404` (any status code), `refused` or `timeout`. A
spec picks one for its simulated pod with the variable SIM_PROBE.
"""

import datetime
import uuid

POD_IP = "10.1.2.3"  # the simulated pods' address, as kubelet's messages name one


def probe_answer(container: dict) -> str | None:
    """The answer the container's readiness probe gets, from its SIM_PROBE variable."""
    env = {e["name"]: e.get("value", "") for e in container.get("env") or []}
    return env.get("SIM_PROBE")


def probe_output(answer: str, container: dict) -> str:
    """kubelet's words for the probe's `answer`: a status code, `refused` or `timeout`."""
    if answer.isdigit():
        return f"HTTP probe failed with statuscode: {answer}"
    get = (container.get("readinessProbe") or {}).get("httpGet") or {}
    port = next((p["containerPort"] for p in container.get("ports") or []), 8080)
    url = f"http://{POD_IP}:{port}{get.get('path', '/')}"
    if answer == "refused":
        return f'Get "{url}": dial tcp {POD_IP}:{port}: connect: connection refused'
    if answer == "timeout":
        why = "context deadline exceeded (Client.Timeout exceeded while awaiting headers)"
        return f'Get "{url}": {why}'
    raise ValueError(f"no simulated probe answer {answer!r}")


def unhealthy(
    pod: dict, container: dict, answer: str, *, at: datetime.datetime | None = None, count: int = 1
) -> dict:
    """The Event kubelet reports when `container`'s readiness probe got `answer`, at `at`."""
    meta = pod["metadata"]
    when = (at or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}"},
        "involvedObject": {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": meta["name"],
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "fieldPath": f"spec.containers{{{container['name']}}}",
        },
        "reason": "Unhealthy",
        "message": f"Readiness probe failed: {probe_output(answer, container)}",
        "type": "Warning",
        "source": {"component": "kubelet", "host": "sim-node"},
        "firstTimestamp": when,
        "lastTimestamp": when,
        "count": count,
        "reportingComponent": "kubelet",
        "reportingInstance": "sim-node",
    }
