"""The one function that makes names safe for Kubernetes.

Object names, label values and host labels all go through `slug`, so what
spinyard creates is named the same way everywhere and `kubectl get` shows
names a person can trace back to an instance, a job or an app.

A name that is already safe stays as it is; any other is cleaned up,
shortened and given a hash of the original, so different inputs never end up
with the same slug. Hashed slugs hold a double dash, which safe names passed
through never do, so the two kinds cannot collide either. (kubespawner's
`slugs.py` works the same way.)
"""

import hashlib
import re

MAX_LENGTH = 63  # a DNS-1123 label, a label value, a Service name
_HASH_LENGTH = 10  # hex digits: 40 bits, collisions need about a million names of one kind


def slug(text: str, *, max_length: int = MAX_LENGTH, extra: str = "") -> str:
    """A name for `text` that is a DNS-1035 label (so also DNS-1123): deterministic and unique.

    The result has only lowercase letters, digits, `-` (and the characters in
    `extra`, e.g. `"._"` for label values), starts with a letter, ends with a
    letter or digit, has no `--` unless it was hashed, and is at most
    `max_length` long. `text` is returned unchanged when it already is all that.

    Args:
        text: any string: an id, `owner.title`, a host part.
        max_length: the longest result allowed, at least 16.
        extra: characters allowed besides `[a-z0-9-]`; only `.` and `_` make sense.

    Raises:
        ValueError: `max_length` is too small to hold a hash, or `extra` is not a subset of `._`.
    """
    if max_length < 16:
        raise ValueError("max_length must be at least 16 to leave room for the hash")
    if not set(extra) <= {".", "_"}:
        raise ValueError("extra may only hold '.' and '_'")
    allowed = "a-z0-9" + re.escape(extra)
    if (
        len(text) <= max_length
        and re.fullmatch(rf"[a-z](?:[{allowed}-]*[a-z0-9])?", text)
        and "--" not in text
    ):
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:_HASH_LENGTH]
    cleaned = re.sub(rf"[^{allowed}]+", "-", text.lower())
    cleaned = re.sub(r"-{2,}", "-", cleaned)
    cleaned = re.sub(r"^[^a-z]+", "", cleaned)  # a letter first: DNS-1035 (Service names)
    keep = max_length - _HASH_LENGTH - 2
    cleaned = re.sub(r"[^a-z0-9]+$", "", cleaned[:keep])
    return f"{cleaned or 'x'}--{digest}"
