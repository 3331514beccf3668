"""spinyard's public contract: event, status, app-spec and error models.

Everything a page, a backend service or a handler exchanges over NATS or the
gateway is defined here, with the msgpack codec and the NATS subject tree.
This package imports nothing else of spinyard, so any Python client can use
it on its own. The names below are imported on first use, so a process that
needs only `schemas.names` (the job runner) does not pay for pydantic.
"""

import importlib

_EXPORTS = {
    "AppSpec": "schemas.spec",
    "AppState": "schemas.status",
    "AppStatus": "schemas.status",
    "ErrorBody": "schemas.errors",
    "ErrorInfo": "schemas.errors",
    "Event": "schemas.events",
    "Heartbeat": "schemas.events",
    "PageLoad": "schemas.events",
    "Phases": "schemas.status",
    "PoolRefill": "schemas.events",
    "ReaperTick": "schemas.events",
    "decode": "schemas.codec",
    "decode_event": "schemas.codec",
    "encode": "schemas.codec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'schemas' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
