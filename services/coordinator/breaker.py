"""Per-node circuit breakers: closed -> open after consecutive failures -> half-open probe -> closed."""
from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class Breaker:
    """One node's breaker. `allow` says whether a call may go; `success`/`failure` report back."""

    failure_threshold: int = 3
    open_seconds: float = 2.0
    clock: Callable[[], float] = time.monotonic
    state: State = State.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probing: bool = field(default=False)
    reason: str = ""  # what the last failure said (kept while the breaker is not closed)

    def would_allow(self) -> bool:
        """Would `allow` let a call through? (Does not claim the half-open probe.)"""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            return self.clock() - self.opened_at >= self.open_seconds
        return not self.probing

    def allow(self) -> bool:
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN and self.clock() - self.opened_at >= self.open_seconds:
            self.state, self.probing = State.HALF_OPEN, False
        if self.state is State.HALF_OPEN and not self.probing:
            self.probing = True  # exactly one trial call at a time
            return True
        return False

    def success(self) -> None:
        self.state, self.failures, self.probing, self.reason = State.CLOSED, 0, False, ""

    def failure(self, reason: str = "") -> None:
        self.failures += 1
        self.reason = reason or self.reason
        if self.state is State.HALF_OPEN or self.failures >= self.failure_threshold:
            self.trip()

    def trip(self, reason: str = "") -> None:
        self.state, self.opened_at, self.probing = State.OPEN, self.clock(), False
        self.reason = reason or self.reason


class Breakers:
    """Breakers by node id, created on first use."""

    def __init__(self, failure_threshold: int = 3, open_seconds: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self._make = lambda: Breaker(failure_threshold, open_seconds, clock)
        self.by_node: dict[str, Breaker] = {}

    def get(self, node_id: str) -> Breaker:
        breaker = self.by_node.get(node_id)
        if breaker is None:
            breaker = self.by_node[node_id] = self._make()
        return breaker

    def blocked(self) -> set[str]:
        """Nodes a call may not go to now (open breakers, or half-open with a probe out)."""
        return {node for node, b in self.by_node.items() if not b.would_allow()}

    def why_blocked(self) -> dict[str, str]:
        """The blocked nodes with what their last failure said."""
        return {node: b.reason for node, b in self.by_node.items() if not b.would_allow()}

