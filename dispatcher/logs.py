"""structlog set-up: JSON lines in production, readable console on a terminal.

A handler process writes one `message_handled` line per message, thousands
a second under load, so a line is made cheaply: the time stamp reuses its
formatted second (`_stamp`), and JSON lines come from one encoder built
once (`_dumps`) instead of one `json.dumps` builds per call, and the lines
of one event loop turn go out in one write (`Lines`), not one write and
flush each. Lines below the configured level cost a no-op method call:
nothing is formatted.
"""

import asyncio
import atexit
import json
import logging
import sys
import time
import weakref

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


_OUTPUTS: "weakref.WeakSet[Lines]" = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:
    for output in list(_OUTPUTS):
        output.flush()


class Lines:
    """structlog's output: lines written to `file` at the end of the event loop turn that
    logged them, all in one write; at once where no loop runs (start-up, other threads).

    A process killed outright (SIGKILL) loses the lines of its last turn at most;
    one that exits writes what is left (`atexit`).
    """

    def __init__(self, file) -> None:
        self.file = file
        self._pending: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        _OUTPUTS.add(self)

    def msg(self, message: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop in this thread: write it now
            self.flush()
            self._write(message + "\n")
            return
        if self._pending and loop is not self._loop:
            self.flush()  # left by a loop that closed before it wrote them
        self._pending.append(message)
        if len(self._pending) == 1:
            self._loop = loop
            loop.call_soon(self.flush)

    log = debug = info = warn = warning = err = error = critical = exception = failure = msg
    fatal = msg

    def flush(self) -> None:
        lines, self._pending = self._pending, []
        if lines:
            self._write("\n".join(lines) + "\n")

    def _write(self, text: str) -> None:
        try:
            self.file.write(text)
            self.file.flush()
        except ValueError:  # the file was closed (a test's captured stderr)
            pass


def configure(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog once for the process."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    output = Lines(sys.stderr)
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
        logger_factory=lambda *_: output,
        cache_logger_on_first_use=False,
    )


def get(name: str = "spinyard", **values) -> structlog.typing.FilteringBoundLogger:
    """A lazy logger: it takes the configuration in force when it first logs, not when made."""
    return structlog.get_logger(name, **values)
