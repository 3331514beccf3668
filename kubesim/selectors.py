"""Label and field selectors, applied as the real API server applies them.

Both are equality requirements (`a=b`, `a==b`, `a!=b`, comma-separated, all
must hold). A label selector reads the object's labels; a field selector reads
the fields the API server lets a kind be selected by, and answers 400 for any
other, as the real one does (`field label not supported: spec.foo`). Only the
fields the backend and its tests use are served: metadata's name and
namespace for every kind, and for Events the core v1 set (`involvedObject.*`,
`reason`, `type`, `source`, `reportingComponent`).
"""

Selector = list[tuple[str, bool, str]]  # (label or field, equal or not, value)

_META_FIELDS = {"metadata.name": "metadata.name", "metadata.namespace": "metadata.namespace"}
# The fields of a core v1 Event the API server selects by, and where each is in the object.
_EVENT_FIELDS = _META_FIELDS | {
    **{
        f"involvedObject.{part}": f"involvedObject.{part}"
        for part in ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion")
    },
    "involvedObject.fieldPath": "involvedObject.fieldPath",
    "reason": "reason",
    "type": "type",
    "source": "source.component",
    "reportingComponent": "reportingComponent",
}
FIELDS = {"Event": _EVENT_FIELDS}


def parse_selector(text: str) -> Selector:
    """A selector's equality requirements (`a=b`, `a==b`, `a!=b`, comma-separated).

    Raises:
        ValueError: a set-based or malformed requirement (the server answers 400).
    """
    found: Selector = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, op, value = next(
            (part.partition(op) for op in ("!=", "==", "=") if op in part), (part, "", "")
        )
        if not op or not key.strip() or any(c in part for c in "() "):
            raise ValueError(f"unsupported selector requirement: {part!r}")
        found.append((key.strip(), op != "!=", value.strip()))
    return found


def selected(obj: dict | None, selector: Selector) -> bool:
    """Whether `obj`'s labels satisfy every requirement (a missing label is not equal)."""
    if obj is None:
        return False
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all((labels.get(key) == value) == equal for key, equal, value in selector)


def parse_fields(text: str, kind: str) -> Selector:
    """A field selector of objects of `kind`, checked against the fields it may select by.

    Raises:
        ValueError: a malformed requirement or a field the kind cannot be selected by.
    """
    found = parse_selector(text)
    known = FIELDS.get(kind, _META_FIELDS)
    for field, _, _ in found:
        if field not in known:
            raise ValueError(f"field label not supported: {field}")
    return found


def fields_selected(obj: dict, selector: Selector, kind: str) -> bool:
    """Whether `obj`'s fields satisfy every requirement (a missing field is empty)."""
    known = FIELDS.get(kind, _META_FIELDS)
    return all((_field(obj, known[field]) == value) == equal for field, equal, value in selector)


def _field(obj: dict, path: str) -> str:
    found: object = obj
    for part in path.split("."):
        found = found.get(part) if isinstance(found, dict) else None
    return "" if found is None else str(found)
