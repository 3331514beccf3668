"""structlog set-up: JSON lines in production, readable console on a terminal."""

import logging
import sys

import structlog

# Keys whose values must never reach a log line.
_SECRET_KEYS = {"password", "token", "secret", "authorization", "secret_key", "access_key"}


def _redact(_, __, event_dict: dict) -> dict:
    for key in event_dict.keys() & _SECRET_KEYS:
        event_dict[key] = "***"
    return event_dict


def configure(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog once for the process."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
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
