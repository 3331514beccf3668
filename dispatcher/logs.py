"""structlog set-up: JSON lines in production, readable console on a terminal.

A handler process writes one `message_handled` line per message, thousands
a second under load, so a line is made cheaply: the time stamp reuses its
formatted second (`_stamp`), and JSON lines come from one encoder built
once (`_dumps`) instead of one `json.dumps` builds per call. Lines below the
configured level cost a no-op method call: nothing is formatted.
"""

import json
import logging
import sys
import time

import structlog

# Keys whose values must never reach a log line.
_SECRET_KEYS = {"password", "token", "secret", "authorization", "secret_key", "access_key"}


def _redact(_, __, event_dict: dict) -> dict:
    for key in event_dict.keys() & _SECRET_KEYS:
        event_dict[key] = "***"
    return event_dict


class _Stamp:
    """structlog's `TimeStamper(fmt="iso", utc=True)`, same text, the second formatted once."""

    def __init__(self) -> None:
        self._second, self._prefix = -1, ""

    def __call__(self, _, __, event_dict: dict) -> dict:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        event_dict["timestamp"] = f"{self._prefix}.{int((now - second) * 1e6):06d}Z"
        return event_dict


def _fallback(value: object) -> object:
    """What JSON cannot hold itself: its `__structlog__()`, else its repr (as structlog does)."""
    to_log = getattr(value, "__structlog__", None)
    return to_log() if to_log is not None else repr(value)


_ENCODER = json.JSONEncoder(default=_fallback)


def _dumps(event_dict: dict, **_) -> str:
    return _ENCODER.encode(event_dict)


def configure(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog once for the process."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _Stamp(),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(name: str = "spinyard", **values) -> structlog.typing.FilteringBoundLogger:
    """A lazy logger: it takes the configuration in force when it first logs, not when made."""
    return structlog.get_logger(name, **values)
