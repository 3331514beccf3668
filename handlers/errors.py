"""Errors a handler raises to say what should happen to its message.

- `PermanentError`: retrying cannot help. The message is dead-lettered, the
  handler's failure hook publishes a `failed` status, no redelivery.
- `RetryableError(delay=)`: try again after `delay` seconds (until the
  handler's tries run out, then as permanent).
- anything else: retried with the handler's backoff, dead-lettered after the last try.

`PublicError` messages are written for users and may be shown in a browser;
other exceptions are logged but never shown.
"""

from schemas import errors as codes


class PublicError(Exception):
    """An error whose code and message are safe to show a browser."""

    code = codes.INTERNAL

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class PermanentError(PublicError):
    """Retrying will not help: dead-letter and report failure."""


class RetryableError(Exception):
    """Try again after `delay` seconds."""

    def __init__(self, message: str, *, delay: float = 1.0) -> None:
        super().__init__(message)
        self.delay = delay


class StartFailed(PermanentError):
    """An instance did not become ready."""

    code = codes.START_FAILED
