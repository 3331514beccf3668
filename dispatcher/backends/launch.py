"""The launch contract: what an app's process or a run's process is given, on every backend.

An app author writes one spec; the local backend runs its `command` as a
process and the Kubernetes backend as a container, and both must hand it the
same things. This module is that hand-over, written once:

- placeholders: `{name}` in `command` and `env` values is replaced by the
  value the backend gives `name` in that context (`viz_values`,
  `job_values`); braces with any other name are left as written. Which names
  a kind may use is checked when the spec is registered
  (`schemas.spec.PLACEHOLDERS`), so an unfilled one never reaches here.
- environments: `viz_env` and `job_env`, the spec's `env` filled, then the
  values of the secrets it names (`secrets`, never filled: a value is the
  publisher's, braces and all), then spinyard's `SPINYARD_*` variables, which
  win over both. The Kubernetes backend passes no values: its pods get the
  secrets from the app's Secret (`secretKeyRef`).
- readiness: an app is ready when `{prefix}` + `readiness_path` answers
  200-399 (a Kubernetes httpGet probe's rule); a start that times out says
  so in the same words on every backend (`not_ready_message`, with the
  probe's last answer from `last_answer`, `status_answer`, `no_answer`).
- ids: instance and job ids name files, URL path segments and Kubernetes
  objects, so a backend takes only the shapes spinyard makes
  (`schemas.names`).

docs/app-spec.md states the same for app authors. Pure: it imports only the
standard library and `schemas.names` (no pydantic), so the job runner, a
process started once per run, stays quick to start.
"""

import re
from collections.abc import Mapping
from http import HTTPStatus
from typing import TYPE_CHECKING

from schemas.names import INSTANCE_ID_RE, JOB_ID_RE

if TYPE_CHECKING:
    from schemas.spec import AppSpec

_BRACED = re.compile(r"\{(\w+)\}")


# -- readiness --


def not_ready_message(timeout_s: float, detail: str) -> str:
    """What a page reads when an app did not become ready: whole seconds, then `detail`
    (the probe's last answer, or what the instance still waits for).

    e.g. `the app did not become ready within 90 s: last answer to /healthz: 404 Not Found`
    """
    return f"the app did not become ready within {max(1, round(timeout_s))} s: {detail}"


def last_answer(path: str, answer: str) -> str:
    """The probe's last answer as a start failure gives it, on every backend.

    e.g. `last answer to /healthz: 404 Not Found`

    Args:
        path: the spec's `readiness_path` (the instance's prefix left out).
        answer: from `status_answer`, `no_answer`, or the connection error's own words
            (`connection refused`).
    """
    return f"last answer to {path}: {answer}"


def status_answer(code: int, reason: str | None = None) -> str:
    """An HTTP answer in words: `404 Not Found` (the standard phrase if `reason` is not given)."""
    if reason is None:
        try:
            reason = HTTPStatus(code).phrase
        except ValueError:
            reason = ""
    return f"{code} {reason}".strip()


def no_answer(limit_s: float) -> str:
    """A probe that timed out, in words: `no answer within 2 s`."""
    return f"no answer within {limit_s:.2g} s"


# -- placeholders --


def viz_values(*, port: int, prefix: str, host: str, python: str) -> dict[str, str]:
    """The value of each placeholder of a viz app (`schemas.spec.PLACEHOLDERS["viz"]`).

    Args:
        port: the port the app must listen on.
        prefix: the URL path it is served under, with leading and trailing `/`.
        host: the address it must bind.
        python: the interpreter `{python}` names.
    """
    return {"port": str(port), "prefix": prefix, "host": host, "python": python}


def job_values(*, python: str) -> dict[str, str]:
    """The value of each placeholder of a job app: only `{python}` (a run serves nothing).

    Args:
        python: the interpreter `{python}` names.
    """
    return {"python": python}


def fill(text: str, values: Mapping[str, str]) -> str:
    """`text` with each `{name}` that `values` has replaced; every other brace stays.

    Args:
        text: a command argument or an environment value of the spec.
        values: from `viz_values` or `job_values`.

    Returns:
        The filled text. A placeholder with no value in `values` is left as written,
        never an error: a message must not fail over an app's own braces.
    """
    return _BRACED.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def argv(spec: "AppSpec", values: Mapping[str, str]) -> list[str]:
    """The spec's `command` with its placeholders filled."""
    return [fill(arg, values) for arg in spec.command]


# -- environments --


def viz_env(
    spec: "AppSpec",
    instance_id: str,
    values: Mapping[str, str],
    secrets: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment a viz instance gets from spinyard.

    Args:
        spec: the app.
        instance_id: the instance's id.
        values: from `viz_values`; its port and prefix are also in the environment.
        secrets: the values of the secrets the spec names, as they are.

    Returns:
        The spec's `env` filled, then `secrets`, then SPINYARD_PORT, SPINYARD_PREFIX,
        SPINYARD_INSTANCE and SPINYARD_APP (`owner/title`).
    """
    return (
        _filled_env(spec, values)
        | dict(secrets or {})
        | {
            "SPINYARD_PORT": values["port"],
            "SPINYARD_PREFIX": values["prefix"],
            "SPINYARD_INSTANCE": instance_id,
            "SPINYARD_APP": spec.name,
        }
    )


def job_env(
    spec: "AppSpec",
    job_id: str,
    values: Mapping[str, str],
    *,
    inputs: str,
    uploads: str,
    output_dir: str,
    deadline_s: float,
    secrets: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment a run gets from spinyard; the paths are where its backend puts the files.

    Args:
        spec: the app (kind job).
        job_id: the run's id.
        values: from `job_values`.
        inputs: path of inputs.json, the run's inputs as a JSON object.
        uploads: path of uploads.json, `{"<output name>": "<presigned PUT URL>"}`.
        output_dir: an empty directory the run may write to.
        deadline_s: seconds the run may take.
        secrets: the values of the secrets the spec names, as they are.

    Returns:
        The spec's `env` filled, then `secrets`, then SPINYARD_JOB_ID, SPINYARD_APP,
        SPINYARD_INPUTS, SPINYARD_UPLOADS, SPINYARD_OUTPUT_DIR and SPINYARD_DEADLINE_S
        (a decimal number).
    """
    return (
        _filled_env(spec, values)
        | dict(secrets or {})
        | {
            "SPINYARD_JOB_ID": job_id,
            "SPINYARD_APP": spec.name,
            "SPINYARD_INPUTS": inputs,
            "SPINYARD_UPLOADS": uploads,
            "SPINYARD_OUTPUT_DIR": output_dir,
            "SPINYARD_DEADLINE_S": f"{deadline_s:g}",
        }
    )


def _filled_env(spec: "AppSpec", values: Mapping[str, str]) -> dict[str, str]:
    return {k: fill(v, values) for k, v in spec.env.items()}


# -- ids --


def valid_id(instance_id: str) -> bool:
    """Whether `instance_id` is an instance id or a job id, as spinyard makes them."""
    return bool(INSTANCE_ID_RE.match(instance_id) or JOB_ID_RE.match(instance_id))


def check_id(instance_id: str) -> str:
    """Return `instance_id` if it is an instance or a job id.

    Raises:
        ValueError: it is neither.
    """
    if not valid_id(instance_id):
        raise ValueError(f"not an instance or job id: {instance_id!r}")
    return instance_id


def check_job_id(job_id: str) -> str:
    """Return `job_id` if it is a job id.

    Raises:
        ValueError: it is not.
    """
    if not JOB_ID_RE.match(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return job_id
