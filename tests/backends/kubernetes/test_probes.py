"""The readiness probe's last answer in a failed start's message, from the pod's Events.

kubelet reports a failed probe only as an Event of the pod (reason Unhealthy);
the simulated kubelet (kubesim.kubelet_events) posts the same Events to the
emulator, which serves core v1 events with their field selectors. Then: how
kubelet's words become spinyard's (the local backend's), and that Events that
cannot be read leave the answer out and fail nothing.
"""

import asyncio
import datetime

import aiohttp
import kmock
import pytest
from structlog.testing import capture_logs

import kubesim
from dispatcher.backends.kubernetes import objects, probes
from dispatcher.backends.kubernetes.resources import EVENTS, PODS
from handlers.errors import StartFailed
from kubesim import kubelet_events
from schemas import errors as codes
from tests.backends.contract import new_id
from tests.backends.kubernetes.support import WAIT_S, sim_spec
from tests.helpers import wait_for

NOT_PASSED = "it runs, but its readiness probe has not passed (the pod's Events hold its answers)"


def event_lists(server) -> list[dict]:
    """The query of each list of Events sent (only the backend lists them)."""
    return [
        dict(r.params)
        for r in server
        if r.action == kmock.action.LIST and r.resource == kubesim.ref(EVENTS)
    ]


async def test_a_probe_answering_404_times_out_naming_it_with_the_log_tail(backend, server):
    spec, iid = sim_spec("hang", env={"SIM_PROBE": "404"}), new_id()
    await backend.start_viz(iid, spec)
    await wait_for(lambda: server.objects_of(EVENTS), what="kubelet's Event")
    with pytest.raises(StartFailed) as failed:
        await backend.wait_ready(iid, spec, 0.6)
    assert failed.value.code == codes.START_TIMEOUT
    assert failed.value.message == (
        "the app did not become ready within 1 s: last answer to /: 404 Not Found"
    )
    assert failed.value.log_tail.startswith(f"{objects.object_name(iid)}-")  # its pod's log
    [pod] = [name for name in server.objects_of(PODS) if name.startswith(f"{iid}-")]
    # one list, selected by the API server on the pod and kubelet's reason
    assert event_lists(server) == [
        {
            "fieldSelector": f"involvedObject.kind=Pod,involvedObject.name={pod},reason=Unhealthy",
            "limit": "500",
        }
    ]
    assert backend.api.calls[("list", "", "events")] == 1


async def test_the_newest_answer_counts_and_other_pods_do_not(backend, server, cluster):
    spec, iid, other = sim_spec("hang"), new_id(), new_id()
    await backend.start_viz(iid, spec)
    await backend.start_viz(other, sim_spec("hang", env={"SIM_PROBE": "500"}))
    await wait_for(lambda: len(server.objects_of(PODS)) == 2, what="both pods")
    pods = server.objects_of(PODS)
    [pod] = [p for name, p in pods.items() if name.startswith(f"{iid}-")]
    now = datetime.datetime.now(datetime.UTC)
    # posted newest first: the answer is the newest by time, not the last listed
    await cluster.probe_failed(pod, "refused", at=now)
    await cluster.probe_failed(pod, "404", at=now - datetime.timedelta(seconds=30))
    await wait_for(lambda: len(server.objects_of(EVENTS)) == 3, what="the Events")
    with pytest.raises(StartFailed) as failed:
        await backend.wait_ready(iid, spec, 0.3)
    assert failed.value.message.endswith(": last answer to /: connection refused")


async def test_a_probe_timing_out_says_within_how_long(backend, server):
    spec, iid = sim_spec("hang", env={"SIM_PROBE": "timeout"}), new_id()
    await backend.start_viz(iid, spec)
    await wait_for(lambda: server.objects_of(EVENTS), what="kubelet's Event")
    with pytest.raises(StartFailed) as failed:
        await backend.wait_ready(iid, spec, 0.3)
    # the Deployment's probe has timeoutSeconds 2, as the local backend's probe
    assert failed.value.message.endswith(": last answer to /: no answer within 2 s")


async def test_a_crash_loop_adds_the_probe_answer(backend, server):
    spec, iid = sim_spec("crash:3", env={"SIM_PROBE": "refused"}), new_id()
    await backend.start_viz(iid, spec)
    await wait_for(lambda: server.objects_of(EVENTS), what="kubelet's Event")
    with pytest.raises(StartFailed) as failed:
        await backend.wait_ready(iid, spec, WAIT_S)
    assert failed.value.code == codes.START_FAILED
    assert failed.value.message == (
        "the app exited with code 3 before it was ready; last answer to /: connection refused"
    )
    assert failed.value.log_tail == "starting\nboom: exiting with 3"


async def test_a_pod_that_never_ran_reads_no_events(backend, server):
    spec, iid = sim_spec("unschedulable", env={"SIM_PROBE": "404"}), new_id()
    await backend.start_viz(iid, spec)
    with pytest.raises(StartFailed, match="not scheduled"):
        await backend.wait_ready(iid, spec, 0.3)
    assert event_lists(server) == []


@pytest.mark.parametrize("status", [403, 500])
async def test_events_that_cannot_be_read_leave_the_answer_out(backend, server, status):
    """A Role without `list events` (403) or a failing API: the same failure as before
    the probe's answer was read, with its log tail; one try, and a debug line says why."""
    spec, iid = sim_spec("hang", env={"SIM_PROBE": "404"}), new_id()
    await backend.start_viz(iid, spec)
    await wait_for(lambda: server.objects_of(EVENTS), what="kubelet's Event")
    message = 'events is forbidden: User "x" cannot list resource "events"'
    server.fail("list", EVENTS, status, times=10, message=message)
    with capture_logs() as logged, pytest.raises(StartFailed) as failed:
        await backend.wait_ready(iid, spec, 0.3)
    assert failed.value.code == codes.START_TIMEOUT
    assert failed.value.message == f"the app did not become ready within 1 s: {NOT_PASSED}"
    assert failed.value.log_tail.startswith(f"{objects.object_name(iid)}-")
    assert backend.api.calls[("list", "", "events")] == 1  # not retried
    [line] = [e for e in logged if e["event"] == "probe_events_unread"]
    assert line["log_level"] == "debug"
    assert line["pod"].startswith(f"{iid}-")
    assert ("may not list events" if status == 403 else "500") in line["error"]


async def test_a_slow_events_list_is_cut_short(make, server):
    backend = await make(events_timeout_s=0.2, api_timeout_s=5.0)
    spec, iid = sim_spec("hang", env={"SIM_PROBE": "404"}), new_id()
    await backend.start_viz(iid, spec)
    await wait_for(lambda: server.objects_of(EVENTS), what="kubelet's Event")
    server.fail("list", EVENTS, 200, delay=3.0)  # far past events_timeout_s
    with pytest.raises(StartFailed) as failed:
        async with asyncio.timeout(2.5):  # api_timeout_s would wait for the answer
            await backend.wait_ready(iid, spec, 0.3)
    assert failed.value.message.endswith(NOT_PASSED)


async def test_events_timeout_zero_reads_none(make, server):
    backend = await make(events_timeout_s=0)
    spec, iid = sim_spec("hang", env={"SIM_PROBE": "404"}), new_id()
    await backend.start_viz(iid, spec)
    await wait_for(lambda: server.objects_of(EVENTS), what="kubelet's Event")
    with pytest.raises(StartFailed) as failed:
        await backend.wait_ready(iid, spec, 0.3)
    assert failed.value.message.endswith(NOT_PASSED)
    assert event_lists(server) == []


# -- the emulator's Events --


async def test_the_emulator_selects_events_by_field_and_refuses_unknown_fields(server):
    async with aiohttp.ClientSession(base_url=str(server.url)) as http:
        for name, reason in (("a", "Unhealthy"), ("b", "Unhealthy"), ("a", "Pulled")):
            pod = {"metadata": {"name": name, "namespace": "spinyard-apps", "uid": name}}
            event = kubelet_events.unhealthy(pod, {"name": "app"}, "404") | {"reason": reason}
            async with http.post(EVENTS.path("spinyard-apps"), json=event) as resp:
                assert resp.status < 300, await resp.text()
        path = EVENTS.path("spinyard-apps")
        selector = probes.field_selector("a")
        async with http.get(path, params={"fieldSelector": selector}) as resp:
            found = (await resp.json())["items"]
        assert [(e["involvedObject"]["name"], e["reason"]) for e in found] == [("a", "Unhealthy")]
        async with http.get(path, params={"fieldSelector": "reason!=Unhealthy"}) as resp:
            assert [e["reason"] for e in (await resp.json())["items"]] == ["Pulled"]
        async with http.get(path, params={"fieldSelector": "spec.x=1"}) as resp:
            assert resp.status == 400
            assert "field label not supported: spec.x" in (await resp.json())["message"]


# -- kubelet's words, spinyard's words --


@pytest.mark.parametrize(
    ("output", "answer"),
    [
        ("HTTP probe failed with statuscode: 404", "404 Not Found"),
        ("HTTP probe failed with statuscode: 503", "503 Service Unavailable"),
        (
            'Get "http://10.1.2.3:8080/apps/a/b/i-1/healthz": dial tcp 10.1.2.3:8080: '
            "connect: connection refused",
            "connection refused",
        ),
        (
            'Get "http://10.1.2.3:8080/x": context deadline exceeded '
            "(Client.Timeout exceeded while awaiting headers)",
            "no answer within 2 s",
        ),
        ('Get "http://10.1.2.3:8080/x?token=s3cret": EOF', "EOF"),
        (
            "Get http://u:s3cret@10.1.2.3:8080/x: read: connection reset by peer",
            "connection reset by peer",
        ),
        ('Get "http://h/?token=s3cret": stopped after 10 redirects', "stopped after 10 redirects"),
        ('"http://h/?token=s3cret"', None),  # nothing but a URL: nothing to say
    ],
)
def test_kubelets_words_become_the_local_backends(output, answer):
    assert probes.answer_of(output, 2) == answer


def test_only_readiness_failures_of_the_app_container_count():
    def event(message, seconds, path="spec.containers{app}", reason="Unhealthy"):
        when = f"2026-01-01T00:00:{seconds:02d}Z"
        return {
            "reason": reason,
            "message": message,
            "lastTimestamp": when,
            "involvedObject": {"kind": "Pod", "name": "p", "fieldPath": path},
        }

    events = [
        event("Readiness probe failed: HTTP probe failed with statuscode: 404", 1),
        event("Liveness probe failed: HTTP probe failed with statuscode: 500", 5),
        event(
            "Readiness probe failed: HTTP probe failed with statuscode: 502",
            6,
            "spec.containers{proxy}",
        ),
        event("Readiness probe failed: HTTP probe failed with statuscode: 418", 7, reason="Other"),
        event(
            "(combined from similar events): Readiness probe failed: HTTP probe failed with "
            "statuscode: 503",
            3,
        ),
    ]
    assert probes.newest_answer(events, "app", 2) == "503 Service Unavailable"
    assert probes.newest_answer(events[1:4], "app", 2) is None
