"""The readiness probe's last answer on Kubernetes, read from the pod's Events.

kubelet keeps a failed probe's answer out of the pod's status: it reports it
as an Event of the pod (type Warning, reason `Unhealthy`), one Event per
distinct answer, counted when it repeats:

    Readiness probe failed: HTTP probe failed with statuscode: 404
    Readiness probe failed: Get "http://10.1.2.3:8080/x": dial tcp 10.1.2.3:8080:
        connect: connection refused

When a start fails, `last_answer` lists the pod's Unhealthy Events (one
request: field selectors on the pod and the reason, `events_timeout_s`, not
retried), takes the newest readiness failure and words it as the local
backend words its own probe's answer (launch.py): `404 Not Found`,
`connection refused`, `no answer within 2 s`. Only those words are kept,
never the probe's URL or anything else the message holds. Reading is best
effort: if the Role does not allow listing Events (403) or the API fails, the
answer is left out, a debug log line says why, and the start still fails
with everything else it knows.
"""

import asyncio
import re

from dispatcher import logs
from dispatcher.backends.kubernetes import status
from dispatcher.backends.kubernetes.api import KubeApi
from dispatcher.backends.kubernetes.resources import EVENTS
from dispatcher.backends.launch import no_answer, status_answer

REASON = "Unhealthy"  # kubelet's reason for a failed probe
_FAILED = "Readiness probe failed: "
_COMBINED = "(combined from similar events): "  # kubelet's aggregation of many answers
_STATUS = re.compile(r"HTTP probe failed with statuscode: (\d{3})\b")
_TIMEOUTS = ("context deadline exceeded", "Client.Timeout exceeded", "i/o timeout")
_QUOTED_OR_URL = re.compile(r'"[^"]*"|\S+://\S*')
_LONGEST = 80  # characters of an answer of a shape not known here
_DEFAULT_PROBE_TIMEOUT_S = 1  # Kubernetes' timeoutSeconds when a probe gives none


def field_selector(pod_name: str) -> str:
    """The field selector of a pod's failed-probe Events (core v1 field names)."""
    return f"involvedObject.kind=Pod,involvedObject.name={pod_name},reason={REASON}"


async def last_answer(api: KubeApi, pod: dict, container: str, limit_s: float) -> str | None:
    """The readiness probe's newest answer to `container` of `pod`, in words; None if
    there is none, `limit_s` is 0, or the Events cannot be read (logged at debug)."""
    name = (pod.get("metadata") or {}).get("name")
    if not name or limit_s <= 0:
        return None
    try:
        async with asyncio.timeout(limit_s):  # the request's own timeouts are per read
            events, _ = await api.list(EVENTS, "", fields=field_selector(name), limit_s=limit_s)
        return newest_answer(events, container, probe_timeout_s(pod, container))
    except Exception as exc:  # best effort: a 403 (ApiError), no answer in time, odd Events
        error = f"{type(exc).__name__}: {exc}"
        logs.get("spinyard.backend.kubernetes").debug("probe_events_unread", pod=name, error=error)
        return None


def newest_answer(events: list[dict], container: str, timeout_s: float) -> str | None:
    """The answer of the newest readiness probe failure of `container` (not of a sidecar
    the pod template adds) among a pod's Events, in words."""
    failures = [
        (event, output)
        for event in events
        if (output := _readiness_output(event, container)) is not None
    ]
    for _, output in sorted(failures, key=lambda found: _when(found[0]), reverse=True):
        answer = answer_of(output, timeout_s)
        if answer:
            return answer
    return None


def answer_of(output: str, timeout_s: float) -> str | None:
    """kubelet's words for a failed httpGet probe, as spinyard words a probe's answer.

    `HTTP probe failed with statuscode: 404` is `404 Not Found`; a timeout is
    `no answer within 2 s`; any other error (`Get "http://…": dial tcp …: connect:
    connection refused`) its last clause, without quoted text or URLs, at most
    80 characters: `connection refused`. None if nothing is left.
    """
    found = _STATUS.search(output)
    if found:
        return status_answer(int(found.group(1)))
    if any(timeout in output for timeout in _TIMEOUTS):
        return no_answer(timeout_s)
    clause = _QUOTED_OR_URL.sub("", output).rsplit(": ", 1)[-1]
    return " ".join(clause.split())[:_LONGEST] or None


def probe_timeout_s(pod: dict, container: str) -> float:
    """The timeoutSeconds of the container's readiness probe, as its pod spec gives it."""
    for found in (pod.get("spec") or {}).get("containers") or []:
        if found.get("name") == container:
            probe = found.get("readinessProbe") or {}
            return float(probe.get("timeoutSeconds") or _DEFAULT_PROBE_TIMEOUT_S)
    return _DEFAULT_PROBE_TIMEOUT_S


def _readiness_output(event: dict, container: str) -> str | None:
    """What the probe got, from a readiness failure Event of `container`; None for any
    other Event."""
    message = event.get("message") or ""
    path = (event.get("involvedObject") or {}).get("fieldPath")
    if event.get("reason") != REASON or path not in (None, "", f"spec.containers{{{container}}}"):
        return None
    message = message.removeprefix(_COMBINED)
    return message.removeprefix(_FAILED) if message.startswith(_FAILED) else None


def _when(event: dict) -> tuple[float, int]:
    """When the Event last happened (the newest of its times; its creation if it has
    none), then its resourceVersion."""
    meta = event.get("metadata") or {}
    times = (
        (event.get("series") or {}).get("lastObservedTime"),
        event.get("lastTimestamp"),
        event.get("eventTime"),
    )
    found = [t for t in map(status.timestamp, times) if t is not None]
    version = str(meta.get("resourceVersion") or "")
    return (
        max(found) if found else status.timestamp(meta.get("creationTimestamp")) or 0.0,
        int(version) if version.isdigit() else 0,
    )
