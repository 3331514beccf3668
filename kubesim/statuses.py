"""The status the simulated controllers write: pods' and Deployments', shaped as real ones.

`controllers.Cluster` patches these onto the objects it simulates, and tests
patch them directly to make a pod ready or a Deployment fail by hand.
"""

from kubesim.apiserver import now_rfc3339


def condition(kind: str, status: str, reason: str | None = None, message: str = "") -> dict:
    found = {"type": kind, "status": status, "lastTransitionTime": now_rfc3339()}
    if reason:
        found |= {"reason": reason, "message": message}
    return found


def pod_running(container: str, ready: bool) -> dict:
    flag = "True" if ready else "False"
    return {
        "phase": "Running",
        "conditions": [
            condition("PodScheduled", "True"),
            condition("Initialized", "True"),
            condition("ContainersReady", flag),
            condition("Ready", flag),
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


def pod_crashlooping(container: str, code: int) -> dict:
    return {
        "phase": "Running",
        "conditions": [condition("PodScheduled", "True"), condition("Ready", "False")],
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


def pod_waiting(container: str, reason: str, message: str | None = None) -> dict:
    return {
        "phase": "Pending",
        "conditions": [condition("PodScheduled", "True"), condition("Ready", "False")],
        "containerStatuses": [
            {
                "name": container,
                "ready": False,
                "restartCount": 0,
                "state": {
                    "waiting": {"reason": reason, "message": message or f"simulated {reason}"}
                },
            }
        ],
    }


def pod_unschedulable() -> dict:
    message = "0/3 nodes are available: 3 Insufficient cpu."
    return {
        "phase": "Pending",
        "conditions": [condition("PodScheduled", "False", "Unschedulable", message)],
    }


def deployment_ready() -> dict:
    return {
        "replicas": 1,
        "readyReplicas": 1,
        "availableReplicas": 1,
        "updatedReplicas": 1,
        "conditions": [
            condition("Available", "True", "MinimumReplicasAvailable"),
            condition("Progressing", "True", "NewReplicaSetAvailable"),
        ],
    }


def deployment_failed() -> dict:
    return {
        "replicas": 1,
        "unavailableReplicas": 1,
        "conditions": [
            condition("Available", "False", "MinimumReplicasUnavailable"),
            condition(
                "Progressing", "False", "ProgressDeadlineExceeded", "ReplicaSet has timed out"
            ),
        ],
    }
