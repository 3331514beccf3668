"""What the client raises: one base class, so a script may catch everything with one clause.

The gateway's own refusals (`{"error": {"code", "message"}}` with an HTTP
status) become `ApiError`; a gateway that cannot be reached, `Unreachable`;
an app that ends `failed` (or stops) while being loaded, `LoadFailed`; a run
that ends other than `succeeded`, `RunFailed`; a wait that runs out,
`WaitTimeout`. Each carries the stable `code` and the `message` that is safe
to show a user, and the status that ended the wait where there is one.
"""

from schemas.status import AppStatus, JobStatus


class SpinyardError(Exception):
    """Anything the client raises on purpose: a `code` (a stable word) and a `message`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ApiError(SpinyardError):
    """The gateway refused a request: its error body's code and message, and the HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code, message)
        self.status = status


class Unreachable(SpinyardError):
    """The gateway could not be reached (or kept answering 503) after the client's tries."""

    def __init__(self, message: str) -> None:
        super().__init__("unreachable", message)


class SpecError(SpinyardError, ValueError):
    """A spec to publish could not be read here: no file, not YAML/JSON, no `name`."""

    def __init__(self, message: str) -> None:
        super().__init__("invalid_spec", message)


class LoadFailed(SpinyardError):
    """The app ended `failed` (its error's code and message) or stopped while it was loaded."""

    def __init__(self, status: AppStatus) -> None:
        if status.error is not None:
            code, message = status.error.code, status.error.message
        else:  # stopped (or stopping) before it was ready: say why it stopped
            code, message = status.state.value, f"{status.app} {status.state.value}"
            message += f" ({status.reason})" if status.reason else ""
        super().__init__(code, message)
        self.status = status


class RunFailed(SpinyardError):
    """The run ended `failed`, `timed_out` or `cancelled`: its error, exit code and log tail."""

    def __init__(self, status: JobStatus) -> None:
        error = status.error
        code = error.code if error else status.state.value
        message = error.message if error else f"the run ended {status.state.value}"
        super().__init__(code, message)
        self.status = status


class WaitTimeout(SpinyardError, TimeoutError):
    """A wait for a status ran out of time; `last` is the last status seen, if any."""

    def __init__(self, what: str, timeout: float, last: AppStatus | JobStatus | None) -> None:
        state = f" (last state: {last.state.value})" if last is not None else ""
        super().__init__("timeout", f"{what} did not finish within {timeout:g} s{state}")
        self.last = last
