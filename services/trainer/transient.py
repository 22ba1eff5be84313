"""Which errors are passing infrastructure trouble (Redis, the registry), and the waits between tries."""
from __future__ import annotations

from dataclasses import dataclass

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
MAX_WAIT_S = 30.0
_MAX_DOUBLINGS = 1000  # 2 ** 1024 is no float; a wait doubled 1,000 times is past any cap


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


@dataclass
class Backoff:
    """The waits of one spell of trouble: `first_s`, doubled each try up to `max_s`; None (give up
    for now) once `limit_s` has passed since the spell's first error."""

    first_s: float
    limit_s: float
    max_s: float = MAX_WAIT_S
    since: float | None = None
    tries: int = 0

    def next_wait(self, now: float) -> float | None:
        if self.since is None:
            self.since = now
        if now - self.since >= self.limit_s:
            return None
        wait = min(self.max_s, self.first_s * 2.0 ** min(self.tries, _MAX_DOUBLINGS))
        self.tries += 1
        return wait

    def elapsed(self, now: float) -> float:
        return 0.0 if self.since is None else now - self.since
