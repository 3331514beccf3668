"""Registering app specs: find spec files and write them to the apps bucket."""

from dataclasses import dataclass
from pathlib import Path

from handlers.state import State
from schemas.spec import AppSpec, load_spec


def find_specs(root: Path) -> list[Path]:
    """Spec files under `root`: YAML files that declare a `name:` and a `command:` or a
    `framework:`."""
    found = []
    for path in sorted(root.rglob("*.y*ml")):
        text = f"\n{path.read_text(errors='replace')}"
        if "\nname:" in text and ("command:" in text or "\nframework:" in text):
            found.append(path)
    return found


@dataclass(frozen=True)
class Registered:
    """What `register` did: the specs it wrote, and the apps registered before that it
    kept (or, with `fresh`, removed)."""

    specs: list[AppSpec]
    kept: list[str]
    removed: list[str]


async def register(state: State, paths: list[Path], fresh: bool = False) -> Registered:
    """Validate every file first, then register them all (none if any is invalid).

    Apps registered earlier (in this data dir) and not among `paths` stay registered,
    unless `fresh`: then they are removed.

    Raises:
        ValueError: a file is not a valid spec; the message names the file and field.
    """
    specs = []
    for path in paths:
        try:
            specs.append(load_spec(path))
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
    names = {spec.name for spec in specs}
    earlier = sorted(e.key for e in await state.apps.scan() if e.key not in names)
    for spec in specs:
        await state.apps.put(spec.name, spec)
    if fresh:
        for name in earlier:
            await state.apps.delete(name)
    return Registered(specs, [] if fresh else earlier, earlier if fresh else [])
