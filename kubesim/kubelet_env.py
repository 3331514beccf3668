"""A container's environment as the simulated kubelet fills it, `secretKeyRef`s included.

A real kubelet reads each `valueFrom.secretKeyRef` variable from its Secret
when it starts the container; a Secret or key that is not there (and not
`optional`) keeps the container waiting in CreateContainerConfigError, with
the message `container_env` gives here in kubelet's words. Values are
`value`s or the Secret's base64 `data`, decoded.
"""

import base64

REASON = "CreateContainerConfigError"


def container_env(container: dict, secrets: dict[str, dict], namespace: str) -> tuple[dict, str]:
    """(the environment, "") or ({}, why the container cannot start).

    Args:
        container: the pod spec's container, as a dict.
        secrets: the Secrets of the pod's namespace, by name.
        namespace: the pod's namespace, as kubelet's message names it.
    """
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        ref = (var.get("valueFrom") or {}).get("secretKeyRef")
        if ref is None:
            env[var["name"]] = var.get("value", "")
            continue
        secret = secrets.get(ref["name"])
        data = (secret or {}).get("data") or {}
        if ref["key"] in data:
            env[var["name"]] = base64.b64decode(data[ref["key"]]).decode()
        elif ref.get("optional"):
            continue
        elif secret is None:
            return {}, f'secret "{ref["name"]}" not found'
        else:
            return {}, f"couldn't find key {ref['key']} in Secret {namespace}/{ref['name']}"
    return env, ""
