"""Waits between tries through one spell of trouble: doubled each try up to a cap, for a limited time."""
from __future__ import annotations

import math
from dataclasses import dataclass

_MAX_DOUBLINGS = 1000  # 2 ** 1024 is no float; a wait doubled 1,000 times is past any cap


@dataclass
class Backoff:
    """The waits of one spell of trouble: `first_s`, doubled each try up to `max_s`; None (give up
    for now) once `limit_s` has passed since the spell's first error (never, by default)."""

    first_s: float
    max_s: float
    limit_s: float = math.inf
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
