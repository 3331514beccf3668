"""Validation of the names that appear in subjects, KV keys, headers and URLs.

App names (`owner/title`), session ids, event ids and job ids become NATS
subject tokens, KV keys, the `Nats-Msg-Id` header and URL path segments, so
they are held to one safe alphabet here rather than escaped in every place
that uses them. Every check matches the whole string: the compiled patterns
end in `\\Z`, not `$`, which would also let a name end in a newline.
`json_pattern` gives the same pattern for JSON Schema (ECMA-262, where `$`
is the end of the string).
"""

import re

_TOKEN = r"[a-z0-9](?:[a-z0-9_-]{0,62})"
APP_PATTERN = rf"{_TOKEN}/{_TOKEN}"
SESSION_PATTERN = r"[A-Za-z0-9_-]{1,64}"
EVENT_ID_PATTERN = r"[A-Za-z0-9_.:-]{1,80}"
JOB_ID_PATTERN = r"j-[a-z0-9]{8,40}"
INSTANCE_ID_PATTERN = r"i-[a-z0-9]{8,40}"
SECRET_NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9_]{0,127}"  # an environment variable's name

APP_RE = re.compile(rf"^({_TOKEN})/({_TOKEN})\Z")
SESSION_RE = re.compile(rf"^{SESSION_PATTERN}\Z")
EVENT_ID_RE = re.compile(rf"^{EVENT_ID_PATTERN}\Z")
JOB_ID_RE = re.compile(rf"^{JOB_ID_PATTERN}\Z")
INSTANCE_ID_RE = re.compile(rf"^{INSTANCE_ID_PATTERN}\Z")
SECRET_NAME_RE = re.compile(rf"^{SECRET_NAME_PATTERN}\Z")


def json_pattern(pattern: str) -> str:
    """One of the `*_PATTERN`s anchored for JSON Schema."""
    return f"^{pattern}$"


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


def check_event_id(event_id: str) -> str:
    """Return `event_id` if it is a valid event id (it becomes the `Nats-Msg-Id` header).

    Raises:
        ValueError: the id is empty, too long or has characters outside [A-Za-z0-9_.:-].
    """
    if not EVENT_ID_RE.match(event_id):
        raise ValueError("id must be 1-80 characters of letters, digits, '_', '.', ':' or '-'")
    return event_id


def check_job_id(job_id: str) -> str:
    """Return `job_id` if it looks like one spinyard makes.

    Raises:
        ValueError: the id is not `j-` and 8-40 of a-z0-9.
    """
    if not JOB_ID_RE.match(job_id):
        raise ValueError("job_id must look like j-<8-40 of a-z0-9>")
    return job_id


def check_secret_name(name: str) -> str:
    """Return `name` if it can name a secret: an environment variable's name, not spinyard's.

    A secret reaches an app as the environment variable of its name, and a
    Kubernetes Secret's key, so it is held to the alphabet both take.

    Raises:
        ValueError: the name is not [A-Za-z_][A-Za-z0-9_]* (1-128 characters), or starts
            with SPINYARD_ (spinyard's own variables win over the app's).
    """
    if not SECRET_NAME_RE.match(name):
        raise ValueError(
            f"secret name {name[:130]!r} is not an environment variable name: a letter or '_', "
            "then letters, digits or '_', at most 128 characters"
        )
    if name.upper().startswith("SPINYARD_"):
        raise ValueError(f"secret name {name!r} starts with SPINYARD_, which is spinyard's own")
    return name


def check_instance_id(instance: str) -> str:
    """Return `instance` if it looks like an instance id spinyard makes.

    Raises:
        ValueError: the id is not `i-` and 8-40 of a-z0-9.
    """
    if not INSTANCE_ID_RE.match(instance):
        raise ValueError("instance must look like i-<8-40 of a-z0-9>")
    return instance


def split_app(name: str) -> tuple[str, str]:
    """Split a checked app name into (owner, title)."""
    owner, title = check_app(name).split("/")
    return owner, title
