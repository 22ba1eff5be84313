"""Circuit breakers per node and per (node, model): closed -> open after failures -> half-open probe."""
from __future__ import annotations

import enum
import functools
import time
from collections.abc import Callable, Collection
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


# Which breakers hear what an attempt says (`verdict`): (the node's, the (node, model) pair's). A
# model's own fault (FAULTY: it answers INTERNAL) says the node is up: that model alone is avoided
# there, so one broken model, or one client sending a model inputs it fails on, takes neither the
# node's other models down nor, served everywhere, every node of the mesh (Envoy caps ejections
# with max_ejection_percent; Triton ejects no node). An attempt timeout (SLOW) is the model's on
# that node too: a slow model keeping a node's cores busy says nothing of the node serving the
# others, and a node that hangs fails its health checks. A node failing every model is avoided
# for each in turn. Connection trouble stays the node's.
BOOKED: dict[Verdict, tuple[Verdict, Verdict]] = {
    Verdict.ANSWERED: (Verdict.ANSWERED, Verdict.ANSWERED),
    Verdict.FAULTY: (Verdict.ANSWERED, Verdict.FAULTY),
    Verdict.SLOW: (Verdict.SILENT, Verdict.SLOW),
    Verdict.DOWN: (Verdict.DOWN, Verdict.SILENT),
    Verdict.SILENT: (Verdict.SILENT, Verdict.SILENT),
}


@dataclass(eq=False)
class Claim:
    """One attempt's hold on its node's breaker and its (node, model) pair's (`probe`,
    `model_probe`: it is the half-open breaker's single trial call), settled once by the attempt's
    verdict: every outcome frees the probes. A node that left the view meanwhile (its breakers
    dropped) is booked nothing."""

    breakers: Breakers
    breaker: Breaker  # the node's
    node_id: str
    model: str
    probe: bool
    model_probe: bool = False
    settled: bool = False

    def settle(self, outcome: Verdict, reason: str = "") -> None:
        if self.settled:
            return
        self.settled = True
        if self.breakers.by_node.get(self.node_id) is self.breaker:
            self.breakers.record(self.node_id, self.model, outcome, reason, self.probe, self.model_probe)


class Breakers:
    """Breakers by node id, and by (node id, model) for the models' own faults and attempt
    timeouts; created on first use (a pair's only once it fails, and dropped once it answers
    again: few are kept). A model is named by its variant's key."""

    def __init__(self, failure_threshold: int = 3, open_seconds: float = 2.0,
                 clock: Callable[[], float] = time.monotonic):
        self._make = lambda node_id, model="": Breaker(failure_threshold, open_seconds, clock,
                                                       on_open=functools.partial(self._opened, node_id, model))
        self.by_node: dict[str, Breaker] = {}
        self.by_model: dict[tuple[str, str], Breaker] = {}
        # told of each breaker that opens: (node id, model), the model "" for the node's own
        self.on_open: Callable[[str, str], None] | None = None

    def _opened(self, node_id: str, model: str) -> None:
        if self.on_open is not None:
            self.on_open(node_id, model)

    def get(self, node_id: str) -> Breaker:
        breaker = self.by_node.get(node_id)
        if breaker is None:
            breaker = self.by_node[node_id] = self._make(node_id)
        return breaker

    def claim(self, node_id: str, model: str = "") -> Claim | None:
        """A call of `model` to the node, claimed now (the probe of each breaker that is
        half-open); None when either breaker lets no call through."""
        breaker, pair = self.get(node_id), self.by_model.get((node_id, model))
        if not breaker.would_allow() or (pair is not None and not pair.would_allow()):
            return None
        breaker.allow()
        claim = Claim(self, breaker, node_id, model, probe=breaker.state is State.HALF_OPEN)
        if pair is not None:
            pair.allow()
            claim.model_probe = pair.state is State.HALF_OPEN
        return claim

    def record(self, node_id: str, model: str, outcome: Verdict, reason: str = "",
               probe: bool = False, model_probe: bool = False) -> None:
        """Book what a call of `model` said (`verdict`) on the breakers that hear it (`BOOKED`);
        `probe`, `model_probe`: the call was that half-open breaker's trial. Without a model
        the node's breaker hears it all."""
        on_node, on_pair = BOOKED[outcome] if model else (outcome, Verdict.SILENT)
        self.get(node_id).record(on_node, reason, probe)
        key = (node_id, model)
        pair = self.by_model.get(key)
        if pair is None and on_pair in (Verdict.FAULTY, Verdict.SLOW) and model:
            pair = self.by_model[key] = self._make(node_id, model)
        if pair is None:
            return
        pair.record(on_pair, reason, model_probe)
        if pair.state is State.CLOSED and not pair.failures:
            del self.by_model[key]  # answering again: nothing to keep

    def allows(self, node_id: str, model: str = "") -> bool:
        """Would `claim` let a call of `model` to the node through? (Claims nothing.)"""
        node, pair = self.by_node.get(node_id), self.by_model.get((node_id, model))
        return all(b is None or b.would_allow() for b in (node, pair))

    def on_trial(self, node_id: str, model: str = "") -> bool:
        """Whether the node's breaker, or that of `model` on it, is not closed (open, or
        half-open): only a probe may go there."""
        return any(b is not None and b.state is not State.CLOSED
                   for b in (self.by_node.get(node_id), self.by_model.get((node_id, model))))

    def drop(self, node_id: str) -> None:
        """Forget a node that left the view."""
        self.by_node.pop(node_id, None)
        for key in [key for key in self.by_model if key[0] == node_id]:
            del self.by_model[key]

    def blocked(self) -> set[str]:
        """Nodes a call may not go to now (open breakers, or half-open with a probe out)."""
        return {node for node, b in self.by_node.items() if not b.would_allow()}

    def why_blocked(self, models: Collection[str] = ()) -> dict[str, str]:
        """The blocked nodes, and those blocked for any of `models`, with what their last failure
        said (a model's: naming it)."""
        why = {node: _model_reason(model, b) for (node, model), b in self.by_model.items()
               if model in models and not b.would_allow()}
        return {**why, **{node: b.reason for node, b in self.by_node.items() if not b.would_allow()}}

    def reason(self, node_id: str, model: str = "") -> str:
        """What the last failure said, of the node's breaker when it is not closed, else of that
        of `model` on it ("" when both are closed)."""
        node, pair = self.by_node.get(node_id), self.by_model.get((node_id, model))
        if node is not None and node.state is not State.CLOSED:
            return node.reason
        if pair is not None and pair.state is not State.CLOSED:
            return _model_reason(model, pair)
        return ""

    def faults(self, node_id: str) -> dict[str, Breaker]:
        """The node's models with a failure counted, by model, with their breakers."""
        return {model: b for (node, model), b in sorted(self.by_model.items()) if node == node_id}


def _model_reason(model: str, breaker: Breaker) -> str:
    return f"model {model}: {breaker.reason}" if breaker.reason else f"model {model}"
