"""Plain data: what JSON and msgpack both carry the same way.

Objects with string keys, arrays, strings of valid Unicode, finite numbers,
64-bit integers, booleans and null. `check_plain` refuses the rest of what
the parsers let through (msgpack bin, the Timestamp extension msgpack
decodes itself, lone surrogates from JSON `\\ud800` escapes, infinities
such as `1e999`, integers beyond 64 bits) and nesting past a limit, so
input that could not be encoded again, or shown to a browser as JSON, is
refused where it arrives instead of failing later.
"""

import math
from typing import Any

import msgpack

_INT_RANGE = (-(2**63), 2**64 - 1)  # what msgpack carries
_SHOWN_KEY = 40  # characters of a key shown in an error path


class NotPlainError(ValueError):
    """A decoded value holds something other than plain data; `where` is its path."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}" if where else reason)
        self.where = where
        self.reason = reason


def _step(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    shown = key if len(key) <= _SHOWN_KEY else key[:_SHOWN_KEY] + "..."
    return f"{where}.{shown}" if where else shown


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_plain(value: Any, *, max_depth: int | None = None, where: str = "") -> None:
    """Check that `value` is plain data, nesting at most `max_depth` objects or arrays.

    `value` itself counts as the first level if it is an object or array. The
    walk is iterative, so any depth the parsers produce is checked safely.

    Raises:
        NotPlainError: naming the first offending place, e.g. `inputs.a[2]`.
    """
    stack: list[tuple[Any, str, int]] = [(value, where, 1)]
    while stack:
        item, at, depth = stack.pop()
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, str):
            if not _encodable(item):
                raise NotPlainError(at, "strings must be valid Unicode (no lone surrogates)")
        elif isinstance(item, int):
            if not _INT_RANGE[0] <= item <= _INT_RANGE[1]:
                raise NotPlainError(at, "integers must fit in 64 bits")
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise NotPlainError(at, "numbers must be finite")
        elif isinstance(item, dict | list):
            if max_depth is not None and depth > max_depth:
                raise NotPlainError(at, f"objects and arrays may nest at most {max_depth} levels")
            if isinstance(item, list):
                stack.extend((x, _step(at, i), depth + 1) for i, x in enumerate(item))
                continue
            for key, x in item.items():
                if not isinstance(key, str) or not _encodable(key):
                    raise NotPlainError(at, "object keys must be strings of valid Unicode")
                stack.append((x, _step(at, key), depth + 1))
        elif isinstance(item, bytes):
            raise NotPlainError(at, "binary values (msgpack bin) are not accepted: send a string")
        elif isinstance(item, msgpack.Timestamp):  # extension type -1, decoded by msgpack itself
            raise NotPlainError(at, "msgpack extension types are not accepted")
        else:
            raise NotPlainError(at, f"{type(item).__name__} values are not accepted")
