"""Which errors are passing infrastructure trouble (Redis, the registry), and the longest wait between tries."""
from __future__ import annotations

import redis.exceptions

from services.common.errors import CneiError, ErrorCode
from services.trainer.rounds import RoundFailed

TRANSIENT_CODES = (ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED)
_TRANSIENT_TYPES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ReadOnlyError,
                    redis.exceptions.TryAgainError, ConnectionError, TimeoutError)
# Redis error replies of a server that cannot take the write now (a failover's demoted primary, a
# replica cut off from its primary, a data set still loading, a script or memory limit): inside a
# Lua script (every fenced save is one) they arrive as a plain ResponseError naming them
_TRANSIENT_REPLIES = ("READONLY", "MASTERDOWN", "LOADING", "BUSY", "OOM", "TRYAGAIN", "CLUSTERDOWN")
MAX_WAIT_S = 30.0  # the cap of the waits (common.backoff) before a job's next try


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` says Redis or the registry is away for now (a connection error, a timeout, a
    registry answering UNAVAILABLE or DEADLINE_EXCEEDED), not that the job itself is wrong. A
    round that got too few clients (RoundFailed, UNAVAILABLE too) is the job's: retried as a
    round (round_retries), then it fails."""
    if isinstance(exc, RoundFailed):
        return False
    if isinstance(exc, CneiError):
        return exc.code in TRANSIENT_CODES
    if isinstance(exc, redis.exceptions.ResponseError) and not isinstance(exc, _TRANSIENT_TYPES):
        words = str(exc).replace("-", " ").split()
        return any(word in _TRANSIENT_REPLIES for word in words)
    return isinstance(exc, _TRANSIENT_TYPES)
