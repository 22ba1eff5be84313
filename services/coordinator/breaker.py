"""Per-node circuit breakers: closed -> open after consecutive failures -> half-open probe -> closed."""
from __future__ import annotations

import enum
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.errors import ErrorCode


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Verdict(enum.Enum):
    """What one attempt says of its node."""

    ANSWERED = "answered"  # the node answered: its outputs, or an error about the request itself
    SLOW = "slow"  # the deployment's attempt timeout passed while the node had the request
    FAULTY = "faulty"  # a fault of the node's own: a crashed backend, a broken runtime, a malformed reply
    DOWN = "down"  # connection-level trouble, or the node refuses this coordinator's calls
    SILENT = "silent"  # nothing: cancelled, the client's own deadline passed, or never sent


# What a node's error answer says of the node, for an attempt the node had: every code named
# (tests check it). Envoy's outlier detection likewise counts 5xx (INTERNAL, UNKNOWN, DATA_LOSS,
# UNAVAILABLE, DEADLINE_EXCEEDED) and lets 4xx (429, RESOURCE_EXHAUSTED, included) break the run.
NODE_VERDICTS: dict[ErrorCode, Verdict] = {
    ErrorCode.UNAVAILABLE: Verdict.DOWN,  # unreachable, connection lost: stop sending there at once
    ErrorCode.PERMISSION_DENIED: Verdict.DOWN,  # its restricted APIs refuse this coordinator (forwarder.refused_by)
    ErrorCode.DEADLINE_EXCEEDED: Verdict.SLOW,
    # a fault of the node's own; UNKNOWN and DATA_LOSS arrive as INTERNAL (forwarder, fast lane, door)
    ErrorCode.INTERNAL: Verdict.FAULTY,
    ErrorCode.INVALID_ARGUMENT: Verdict.ANSWERED,  # the request's own
    ErrorCode.NOT_FOUND: Verdict.ANSWERED,
    ErrorCode.ALREADY_EXISTS: Verdict.ANSWERED,
    ErrorCode.FAILED_PRECONDITION: Verdict.ANSWERED,
    ErrorCode.RESOURCE_EXHAUSTED: Verdict.ANSWERED,  # its queue is full: busy, not broken (Envoy: 429 is no 5xx)
    ErrorCode.CANCELLED: Verdict.SILENT,
}


def verdict(code: ErrorCode | None, sent: bool = True, attempt_timeout_first: bool = True) -> Verdict:
    """The verdict of an attempt that succeeded (`code` None) or failed with `code` (the full
    path's attempts and the front door's failed node calls alike); `sent`: the node was sent the
    request; `attempt_timeout_first`: the deployment's attempt timeout came before the client's
    own deadline (else a DEADLINE_EXCEEDED is the client's impatience)."""
    if code is None:
        return Verdict.ANSWERED
    said = NODE_VERDICTS[code]
    if said is Verdict.DOWN:
        return said  # connection-level trouble says so before the request is sent too
    if not sent or (said is Verdict.SLOW and not attempt_timeout_first):
        return Verdict.SILENT
    return said


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
    on_open: Callable[[], None] | None = field(default=None, repr=False)  # told each time it opens

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

    def release(self) -> None:
        """The half-open probe ended without saying anything of the node (its client cancelled,
        its own deadline passed, it was never sent): the next call may probe."""
        if self.state is State.HALF_OPEN:
            self.probing = False

    def success(self) -> None:
        self.state, self.failures, self.probing, self.reason = State.CLOSED, 0, False, ""

    def failure(self, reason: str = "") -> None:
        self.failures += 1
        self.reason = reason or self.reason
        if self.state is State.HALF_OPEN or self.failures >= self.failure_threshold:
            self.trip()

    def trip(self, reason: str = "") -> None:
        opens = self.state is not State.OPEN
        self.state, self.opened_at, self.probing = State.OPEN, self.clock(), False
        self.reason = reason or self.reason
        if opens and self.on_open is not None:
            self.on_open()

    def record(self, outcome: Verdict, reason: str = "", probe: bool = False) -> None:
        """Book what a call said of the node (`verdict`); `probe`: the call was the half-open
        breaker's trial, which a SILENT outcome frees for the next call."""
        if outcome is Verdict.ANSWERED:
            self.success()
        elif outcome in (Verdict.SLOW, Verdict.FAULTY):
            self.failure(reason)
        elif outcome is Verdict.DOWN:
            self.trip(reason)
        elif probe:
            self.release()


@dataclass(eq=False)
class Claim:
    """One attempt's hold on its node's breaker (`probe`: it is the half-open breaker's single
    trial call), settled once by the attempt's verdict: every outcome frees the probe."""

    breaker: Breaker
    probe: bool
    settled: bool = False

    def settle(self, outcome: Verdict, reason: str = "") -> None:
        if self.settled:
            return
        self.settled = True
        self.breaker.record(outcome, reason, self.probe)


class Breakers:
    """Breakers by node id, created on first use."""

    def __init__(self, failure_threshold: int = 3, open_seconds: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self._make = lambda node_id: Breaker(failure_threshold, open_seconds, clock,
                                             on_open=functools.partial(self._opened, node_id))
        self.by_node: dict[str, Breaker] = {}
        self.on_open: Callable[[str], None] | None = None  # told of each node whose breaker opens

    def _opened(self, node_id: str) -> None:
        if self.on_open is not None:
            self.on_open(node_id)

    def get(self, node_id: str) -> Breaker:
        breaker = self.by_node.get(node_id)
        if breaker is None:
            breaker = self.by_node[node_id] = self._make(node_id)
        return breaker

    def claim(self, node_id: str) -> Claim | None:
        """A call to the node, claimed now (the probe, when its breaker is half-open); None when
        its breaker lets no call through."""
        breaker = self.get(node_id)
        if not breaker.allow():
            return None
        return Claim(breaker, probe=breaker.state is State.HALF_OPEN)

    def on_trial(self, node_id: str) -> bool:
        """Whether the node's breaker is not closed (open, or half-open): only a probe may go there."""
        breaker = self.by_node.get(node_id)
        return breaker is not None and breaker.state is not State.CLOSED

    def drop(self, node_id: str) -> None:
        """Forget a node that left the view."""
        self.by_node.pop(node_id, None)

    def blocked(self) -> set[str]:
        """Nodes a call may not go to now (open breakers, or half-open with a probe out)."""
        return {node for node, b in self.by_node.items() if not b.would_allow()}

    def why_blocked(self) -> dict[str, str]:
        """The blocked nodes with what their last failure said."""
        return {node: b.reason for node, b in self.by_node.items() if not b.would_allow()}

