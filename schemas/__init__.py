"""spinyard's public contract: event, status, app-spec and error models.

Everything a page, a backend service or a handler exchanges over NATS or the
gateway is defined here, with the msgpack codec and the NATS subject tree.
This package imports nothing else of spinyard, so any Python client can use
it on its own.
"""

from schemas.codec import decode, decode_event, encode
from schemas.errors import ErrorBody, ErrorInfo
from schemas.events import Event, Heartbeat, PageLoad, PoolRefill, ReaperTick
from schemas.spec import AppSpec
from schemas.status import AppState, AppStatus, Phases

__all__ = [
    "AppSpec",
    "AppState",
    "AppStatus",
    "ErrorBody",
    "ErrorInfo",
    "Event",
    "Heartbeat",
    "PageLoad",
    "Phases",
    "PoolRefill",
    "ReaperTick",
    "decode",
    "decode_event",
    "encode",
]
