"""The error body every 4xx answer and every `failed` status carries.

`code` is a stable machine-readable word; `message` is safe to show a user.
"""

from pydantic import BaseModel, ConfigDict

# Stable error codes. Add, never rename.
BAD_REQUEST = "bad_request"
BAD_ENCODING = "bad_encoding"
INVALID_EVENT = "invalid_event"
INVALID_SPEC = "invalid_spec"
UNKNOWN_APP = "unknown_app"
WRONG_KIND = "wrong_kind"
TOO_LARGE = "too_large"
TOO_MANY = "too_many"
UNAUTHORIZED = "unauthorized"
FORBIDDEN = "forbidden"
NOT_FOUND = "not_found"
METHOD_NOT_ALLOWED = "method_not_allowed"
START_TIMEOUT = "start_timeout"
START_FAILED = "start_failed"
INSTANCE_LOST = "instance_lost"
BAD_RESULTS = "bad_results"
DEADLINE_EXCEEDED = "deadline_exceeded"
JOB_FAILED = "job_failed"
CANCELLED = "cancelled"
INTERNAL = "internal"
UNAVAILABLE = "unavailable"
MISSING_SECRET = "missing_secret"
INVALID_SECRET = "invalid_secret"
UNKNOWN_REVISION = "unknown_revision"
AT_CAPACITY = "at_capacity"


class ErrorInfo(BaseModel):
    """What went wrong, in a form safe to show a browser."""

    model_config = ConfigDict(extra="ignore")

    code: str
    message: str


class ErrorBody(BaseModel):
    """The body of every error answer: `{"error": {"code", "message"}}`."""

    error: ErrorInfo

    @classmethod
    def of(cls, code: str, message: str) -> "ErrorBody":
        return cls(error=ErrorInfo(code=code, message=message))
