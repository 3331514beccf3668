"""Reference tables for the docs, generated from the models so they cannot drift.

`python -m dispatcher.reference` rewrites the generated parts of
docs/configuration.md and docs/app-spec.md; a test fails when they are stale.
"""

import sys
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic_core import PydanticUndefined

from dispatcher.settings import Settings
from schemas.spec import AppSpec

BEGIN, END = "<!-- generated: begin -->", "<!-- generated: end -->"
DOCS = Path(__file__).resolve().parent.parent / "docs"


def _default(field) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, SecretStr):
        return "(secret)"
    if value is None:
        return "unset"
    return f"`{value}`"


def _item_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a `list[Model]` field, else None."""
    args = get_args(annotation)
    if get_origin(annotation) is list and args and isinstance(args[0], type):
        return args[0] if issubclass(args[0], BaseModel) else None
    return None


def _rows(model: type[BaseModel], prefix: str, sep: str, env: bool) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        path = f"{prefix}{field.alias if field.alias and not env else name}"  # `from`, not `start`
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _rows(annotation, f"{path}{sep}", sep, env)
            continue
        shown = f"SPINYARD_{path.upper()}" if env else path
        text = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{shown}` | {_default(field)} | {text} |")
        item = _item_model(annotation)
        if item is not None:  # a list of models (a spec's `schedule`): its fields as `name[].x`
            rows += _rows(item, f"{path}[]{sep}", sep, env)
    return rows


def settings_table() -> str:
    head = ["| variable | default | meaning |", "|---|---|---|"]
    return "\n".join(head + _rows(Settings, "", "__", env=True))


def spec_table() -> str:
    head = ["| field | default | meaning |", "|---|---|---|"]
    return "\n".join(head + _rows(AppSpec, "", ".", env=False))


def render(path: Path, table: str) -> str:
    text = path.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + table + "\n" + text[end:]


TARGETS = {"configuration.md": settings_table, "app-spec.md": spec_table}


def main() -> int:
    for name, table in TARGETS.items():
        path = DOCS / name
        path.write_text(render(path, table()))
        sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
