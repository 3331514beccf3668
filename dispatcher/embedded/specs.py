"""Registering app specs: find spec files and write them to the apps bucket."""

from pathlib import Path

from handlers.state import State
from schemas.spec import AppSpec, load_spec


def find_specs(root: Path) -> list[Path]:
    """Spec files under `root`: YAML files that declare a `name:` and a `command:`."""
    found = []
    for path in sorted(root.rglob("*.y*ml")):
        text = path.read_text(errors="replace")
        if "\nname:" in f"\n{text}" and "command:" in text:
            found.append(path)
    return found


async def register(state: State, paths: list[Path]) -> list[AppSpec]:
    """Validate every file first, then register them all (none if any is invalid).

    Raises:
        ValueError: a file is not a valid spec; the message names the file and field.
    """
    specs = []
    for path in paths:
        try:
            specs.append(load_spec(path))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
    for spec in specs:
        await state.apps.put(spec.name, spec)
    return specs
