"""How the client sends a spec: a file as written (the same file, the same digest), or data
as JSON."""

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from schemas.spec import AppSpec
from spinyard.errors import SpecError

YAML = "application/yaml"


def read_file(path: Path) -> tuple[bytes, str, Any]:
    """A spec file's bytes, its content type and its parsed data.

    Raises:
        SpecError: the file cannot be read or is not YAML (JSON is YAML too).
    """
    try:
        body = path.read_bytes()
        data = yaml.safe_load(body)
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError(f"{path}: {exc}") from exc
    json_file = path.suffix == ".json"
    return body, "application/json" if json_file else YAML, data


def as_json(spec: AppSpec | Mapping[str, Any]) -> tuple[bytes, str, dict[str, Any]]:
    """A spec given as data: its JSON body, content type and the data (an `AppSpec` sends
    only the fields it was given, so its digest is that of the same spec written by hand)."""
    if isinstance(spec, AppSpec):
        data = spec.model_dump(mode="json", exclude_unset=True)
    else:
        data = dict(spec)
    return json.dumps(data).encode(), "application/json", data
