"""Validation of the names that appear in subjects, KV keys and URLs.

App names (`owner/title`), session ids and job ids become NATS subject
tokens, KV keys and URL path segments, so they are held to one safe
alphabet here rather than escaped in every place that uses them.
"""

import re

_TOKEN = r"[a-z0-9](?:[a-z0-9_-]{0,62})"
APP_RE = re.compile(rf"^({_TOKEN})/({_TOKEN})$")
SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
JOB_ID_RE = re.compile(r"^j-[a-z0-9]{8,40}$")
INSTANCE_ID_RE = re.compile(r"^i-[a-z0-9]{8,40}$")


def check_app(name: str) -> str:
    """Return `name` if it is a valid `owner/title`.

    Raises:
        ValueError: the name is not two lowercase tokens joined by `/`.
    """
    if not APP_RE.match(name):
        raise ValueError(
            "app must be 'owner/title': lowercase letters, digits, '-' or '_', "
            "each part starting with a letter or digit, at most 63 characters"
        )
    return name


def check_session(session: str) -> str:
    """Return `session` if it is a valid session id.

    Raises:
        ValueError: the id is empty, too long or has characters outside [A-Za-z0-9_-].
    """
    if not SESSION_RE.match(session):
        raise ValueError("session must be 1-64 characters of letters, digits, '-' or '_'")
    return session


def split_app(name: str) -> tuple[str, str]:
    """Split a checked app name into (owner, title)."""
    owner, title = check_app(name).split("/")
    return owner, title
