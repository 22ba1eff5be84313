"""One root error type with transport-neutral codes; adapters map codes to gRPC/HTTP status."""
from __future__ import annotations

import asyncio
import enum


class ErrorCode(enum.Enum):
    """Transport-neutral error codes (names match gRPC status codes)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    INTERNAL = "INTERNAL"


HTTP_STATUS = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.FAILED_PRECONDITION: 412,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
    ErrorCode.CANCELLED: 499,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.INTERNAL: 500,
}


def outcome_of(exc: BaseException) -> str:
    """The metrics label of a failed request: its code in lower case, `cancelled` for one its
    caller gave up on (its handler cancelled: a gRPC cancel, an HTTP client hanging up),
    `internal` when unplanned."""
    if isinstance(exc, CneiError):
        return exc.code.value.lower()
    return "cancelled" if isinstance(exc, asyncio.CancelledError) else "internal"


def describe(exc: BaseException) -> str:
    """An exception as a log line says it: its type, then its message when it has one (nats-py's
    and asyncio's timeouts have none)."""
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


class CneiError(Exception):
    """Root of every error CNEI raises on purpose; carries a code and a readable message."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class InvalidArgument(CneiError):
    code = ErrorCode.INVALID_ARGUMENT


class TensorError(InvalidArgument):
    """A tensor of a request is malformed; names the tensor and what was expected."""

    def __init__(self, tensor: str, problem: str):
        self.tensor = tensor
        super().__init__(f"tensor '{tensor}': {problem}")


class NotFound(CneiError):
    code = ErrorCode.NOT_FOUND


class ModelNotFound(NotFound):

    def __init__(self, name: str, version: str = "", precision: str = ""):
        self.name, self.version, self.precision = name, version, precision
        what = f"model '{name}'"
        if version:
            what += f" version {version}"
        if precision:
            what += f" precision {precision}"
        super().__init__(f"{what} not found")


class ArtifactNotFound(NotFound):

    def __init__(self, sha256: str):
        self.sha256 = sha256
        super().__init__(f"artifact sha256:{sha256} not found")


class AlreadyExists(CneiError):
    code = ErrorCode.ALREADY_EXISTS


class FailedPrecondition(CneiError):
    code = ErrorCode.FAILED_PRECONDITION


class ResourceExhausted(CneiError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class Unavailable(CneiError):
    code = ErrorCode.UNAVAILABLE


def _clip(text: str, limit: int) -> str:
    """`text` within `limit` characters: its start and its end (where gRPC and TLS errors say
    what went wrong) with an ellipsis between."""
    if len(text) <= limit:
        return text
    head = limit // 3
    return f"{text[:head]}…{text[len(text) - (limit - head - 1):]}"


class NoLiveNode(Unavailable):
    SHOWN = 3  # nodes named in the message, at most

    def __init__(self, model: str, out_of_use: dict[str, str] | None = None):
        """`out_of_use`: nodes left out after failures, with what their last failure said, the
        likeliest to matter first (the first SHOWN are named)."""
        self.model = model
        message = f"no live node can serve model '{model}'"
        if out_of_use:
            named = [f"{node} ({_clip(why or 'failed', 240)})" for node, why in list(out_of_use.items())[:self.SHOWN]]
            more = len(out_of_use) - self.SHOWN
            message += f"; out of use after failures: {', '.join(named)}" + (f" and {more} more" if more > 0 else "")
        super().__init__(message)


class AttemptTimedOut(Unavailable):
    """A node had no answer within one attempt's limit while the request's own deadline had not
    passed: that node failed, not the request (it fails over; the client's deadline is its own)."""

    def __init__(self, node_id: str, model: str, limit_s: float | None, sent: bool = True, said: str = ""):
        """`limit_s`: the attempt's limit that passed (None: the node gave up before it, `said`)."""
        self.node_id, self.model, self.limit_s = node_id, model, limit_s
        if limit_s is None:
            message = f"node {node_id} timed out on model {model} before the request's deadline ({said})"
        else:
            where = "did not answer" if sent else "was not free to take"
            message = f"node {node_id} {where} model {model} within its attempt limit of {limit_s:.3f} s"
        super().__init__(message)


class DeadlineExceeded(CneiError):
    code = ErrorCode.DEADLINE_EXCEEDED


class Cancelled(CneiError):
    code = ErrorCode.CANCELLED


class PermissionDenied(CneiError):
    """A server's restricted API refused a call without its header (e.g. a registry's)."""

    code = ErrorCode.PERMISSION_DENIED


_BY_CODE = {cls.code: cls for cls in (
    InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted,
    Unavailable, DeadlineExceeded, Cancelled, PermissionDenied,
)}


def error_for(code: ErrorCode, message: str) -> CneiError:
    """The error class that stands for `code` (e.g. a remote ALREADY_EXISTS -> AlreadyExists)."""
    cls = _BY_CODE.get(code)
    return cls(message) if cls else CneiError(message, code)
