"""Errors a handler raises, on two separate axes.

What happens to the message (kopf's `PermanentError`/`TemporaryError`):

- `PermanentError`: retrying cannot help. The message is dead-lettered at
  once, the handler's failure hook runs, no redelivery.
- `RetryableError(delay=, until=)`: try again after `delay` seconds or the
  handler's backoff for that try, whichever is longer (so the backoff still
  grows), until the handler's tries run out, then it is dead-lettered. With
  `until` (a Unix time), a handler registered `patient` is tried past its
  `retries` until then (a store outage while a run's results wait).
- anything else: retried with the handler's backoff, dead-lettered after the
  last try.

What a browser may read (dask-gateway's `PublicException`): only an error
that is also a `PublicError` reaches a page with its own code and message.
Any other error reaches the page as `internal` / "spinyard could not handle
this event", and its detail (a Kubernetes 403 naming the service account,
a store's address) goes to the operators' logs and the dead letter only.
Errors written for the page are both: `Rejected` (unknown app, wrong kind,
too large, no such run) and `StartFailed`. A start failure's message says
what happened in the page's words (the exit code, or the seconds waited and
the readiness probe's last answer, e.g. `404 Not Found`); its `log_tail`, the
last lines of the app's own output, reaches the page too, in the status's
`log_tail`, as a failed run's does: it is the app author's output (apps never
get spinyard's settings or credentials), bounded in lines and bytes, and it
is what tells a viewer or author why the app did not come up.
"""

from schemas import errors as codes
from schemas.errors import ErrorInfo


class SpinyardError(Exception):
    """An error with a stable `code` and a `message` (for operators, unless public)."""

    code = codes.INTERNAL

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class PublicError(SpinyardError):
    """An error whose code and message are safe to show a browser."""


class PermanentError(SpinyardError):
    """Retrying will not help: dead-letter and report failure."""


class RetryableError(SpinyardError):
    """Try again after `delay` seconds at least; with `until`, past the handler's tries."""

    def __init__(
        self,
        message: str,
        *,
        delay: float = 1.0,
        code: str | None = None,
        until: float | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.delay = delay
        self.until = until


class Rejected(PermanentError, PublicError):
    """The event asks for what cannot be done (no such app, wrong kind, too large, no such run)."""


class StartFailed(PermanentError, PublicError):
    """An instance did not become ready; `log_tail` is the end of the app's own log."""

    code = codes.START_FAILED

    def __init__(
        self, message: str, *, code: str | None = None, log_tail: str | None = None
    ) -> None:
        super().__init__(message, code=code)
        self.log_tail = log_tail or None


# What a page sees of an error that is not public.
HIDDEN = ErrorInfo(code=codes.INTERNAL, message="spinyard could not handle this event")


def public_info(exc: BaseException) -> ErrorInfo:
    """What a page may read of `exc`: its own code and message if public, else `HIDDEN`."""
    if isinstance(exc, PublicError):
        return ErrorInfo(code=exc.code, message=exc.message)
    return HIDDEN
