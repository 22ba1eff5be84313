"""Circuit breaker state machine: closed -> open -> half-open (one probe) -> closed or open."""
from __future__ import annotations

import pytest

from services.common.errors import ErrorCode
from services.coordinator.breaker import NODE_VERDICTS, Breaker, Breakers, State, Verdict, verdict


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_closed_breaker_lets_calls_through_and_counts_consecutive_failures(clock):
    b = Breaker(failure_threshold=3, open_seconds=2.0, clock=clock)
    assert b.allow()
    b.failure()
    b.failure()
    assert b.state is State.CLOSED and b.allow()
    b.success()
    b.failure()
    b.failure()
    assert b.state is State.CLOSED, "a success resets the count"


def test_the_threshold_of_failures_opens_it_and_an_open_breaker_blocks(clock):
    b = Breaker(failure_threshold=3, open_seconds=2.0, clock=clock)
    for _ in range(3):
        b.failure()
    assert b.state is State.OPEN
    assert not b.allow() and not b.would_allow()
    clock.now += 1.9
    assert not b.allow()


def test_after_the_open_time_exactly_one_probe_goes_through(clock):
    b = Breaker(failure_threshold=1, open_seconds=2.0, clock=clock)
    b.trip()
    clock.now += 2.0
    assert b.would_allow()
    assert b.allow() and b.state is State.HALF_OPEN
    assert not b.allow() and not b.would_allow(), "only one probe at a time"


def test_a_successful_probe_closes_it(clock):
    b = Breaker(failure_threshold=1, open_seconds=2.0, clock=clock)
    b.trip()
    clock.now += 2.5
    assert b.allow()
    b.success()
    assert b.state is State.CLOSED and b.failures == 0 and b.allow()


def test_a_failed_probe_opens_it_again_for_a_new_period(clock):
    b = Breaker(failure_threshold=5, open_seconds=2.0, clock=clock)
    b.trip()
    clock.now += 2.0
    assert b.allow()
    b.failure()
    assert b.state is State.OPEN and b.opened_at == clock.now
    clock.now += 1.0
    assert not b.allow()


def test_breakers_report_the_nodes_calls_may_not_go_to(clock):
    breakers = Breakers(failure_threshold=1, open_seconds=2.0, clock=clock)
    breakers.get("edge-1").trip()
    breakers.get("edge-2").success()
    assert breakers.blocked() == {"edge-1"}
    clock.now += 2.0
    assert breakers.blocked() == set(), "an expired open breaker may be probed"
    assert breakers.get("edge-1").allow()
    assert breakers.blocked() == {"edge-1"}, "while its probe is out"


def test_a_blocked_node_keeps_what_its_last_failure_said_until_it_succeeds(clock):
    breakers = Breakers(failure_threshold=2, open_seconds=2.0, clock=clock)
    edge = breakers.get("edge-1")
    edge.failure("timed out")
    assert breakers.why_blocked() == {}  # below the threshold: still serving
    edge.failure()  # a failure that says nothing keeps the last reason
    assert breakers.why_blocked() == {"edge-1": "timed out"}
    breakers.get("edge-2").trip("TLS handshake: certificate not trusted")
    assert breakers.why_blocked() == {"edge-1": "timed out", "edge-2": "TLS handshake: certificate not trusted"}
    clock.now += 2.0
    assert edge.allow()
    edge.success()
    assert edge.reason == "" and "edge-1" not in breakers.why_blocked()


def test_no_live_node_names_the_nodes_out_of_use_and_why():
    from services.common.errors import ErrorCode, NoLiveNode
    assert NoLiveNode("digits").message == "no live node can serve model 'digits'"
    long = "failed to connect to all addresses; " * 20 + "CERTIFICATE_VERIFY_FAILED"
    error = NoLiveNode("digits", {"e1": "refused", "e2": long, "e3": "", "e4": "x"})
    assert error.code is ErrorCode.UNAVAILABLE
    assert error.message.startswith("no live node can serve model 'digits'; out of use after failures: e1 (refused), ")
    assert "CERTIFICATE_VERIFY_FAILED)" in error.message and len(error.message) < 600  # the end of a long reason kept
    assert "e3 (failed)" in error.message and error.message.endswith(" and 1 more")


@pytest.mark.parametrize(
    ("code", "sent", "attempt_timeout_first", "expected"),
    [(None, True, False, Verdict.ANSWERED),
     (ErrorCode.UNAVAILABLE, True, False, Verdict.DOWN),
     (ErrorCode.UNAVAILABLE, False, False, Verdict.DOWN),
     (ErrorCode.DEADLINE_EXCEEDED, True, True, Verdict.SLOW),
     (ErrorCode.DEADLINE_EXCEEDED, True, False, Verdict.SILENT),
     (ErrorCode.DEADLINE_EXCEEDED, False, True, Verdict.SILENT),
     (ErrorCode.INVALID_ARGUMENT, True, False, Verdict.ANSWERED),
     (ErrorCode.NOT_FOUND, True, False, Verdict.ANSWERED),
     (ErrorCode.RESOURCE_EXHAUSTED, True, False, Verdict.ANSWERED),
     (ErrorCode.RESOURCE_EXHAUSTED, False, False, Verdict.SILENT),
     (ErrorCode.PERMISSION_DENIED, True, False, Verdict.DOWN),
     (ErrorCode.CANCELLED, True, True, Verdict.SILENT),
     (ErrorCode.INTERNAL, True, False, Verdict.FAULTY),
     (ErrorCode.INTERNAL, False, False, Verdict.SILENT)],
    ids=["answered", "connection-lost", "unreachable", "attempt-timeout", "clients-own-deadline",
         "expired-while-queued", "request-refused-by-node", "model-not-at-node", "node-queue-full",
         "own-queue-full", "node-refuses-the-coordinator", "cancelled", "node-fault", "own-fault-before-sending"])
def test_what_an_attempt_says_of_its_node(code, sent, attempt_timeout_first, expected):
    assert verdict(code, sent, attempt_timeout_first) is expected


def test_every_error_code_says_something_of_the_node():
    assert set(NODE_VERDICTS) == set(ErrorCode)


@pytest.mark.parametrize(
    ("outcome", "probe", "state", "failures"),
    [(Verdict.ANSWERED, False, State.CLOSED, 0), (Verdict.SLOW, False, State.OPEN, 3),
     (Verdict.FAULTY, False, State.OPEN, 3),
     (Verdict.DOWN, False, State.OPEN, 2), (Verdict.SILENT, False, State.HALF_OPEN, 2),
     (Verdict.SILENT, True, State.HALF_OPEN, 2)])
def test_a_verdict_is_booked_on_a_breaker_with_or_without_a_claim(clock, outcome, probe, state, failures):
    b = Breaker(failure_threshold=3, open_seconds=2.0, clock=clock)
    b.failure()
    b.failure()
    b.trip()
    clock.now += 2.0
    assert b.allow()  # a probe is out
    b.record(outcome, "said", probe)
    assert (b.state, b.failures) == (state, failures)
    assert b.probing is (outcome is Verdict.SILENT and not probe), "only the probe's own silence frees it"


@pytest.mark.parametrize(
    ("outcome", "state"),
    [(Verdict.ANSWERED, State.CLOSED), (Verdict.SLOW, State.OPEN), (Verdict.FAULTY, State.OPEN),
     (Verdict.DOWN, State.OPEN),
     (Verdict.SILENT, State.HALF_OPEN)])
def test_every_outcome_of_a_probe_frees_it(clock, outcome, state):
    breakers = Breakers(failure_threshold=3, open_seconds=2.0, clock=clock)
    breakers.get("edge-1").trip("down")
    clock.now += 2.0
    probe = breakers.claim("edge-1")
    assert probe is not None and probe.probe
    assert breakers.claim("edge-1") is None, "one probe at a time"
    probe.settle(outcome, "timed out")
    probe.settle(Verdict.ANSWERED)  # settled once: later calls change nothing
    b = breakers.get("edge-1")
    assert b.state is state and not b.probing
    assert (state is State.OPEN) is not b.would_allow()


def test_a_call_that_is_not_the_probe_never_frees_the_probe(clock):
    breakers = Breakers(failure_threshold=1, open_seconds=2.0, clock=clock)
    earlier = breakers.claim("edge-1")  # while closed
    breakers.get("edge-1").trip()
    clock.now += 2.0
    probe = breakers.claim("edge-1")
    earlier.settle(Verdict.SILENT)
    assert not earlier.probe and probe.probe and breakers.claim("edge-1") is None


def test_breakers_tell_of_each_node_whose_breaker_opens_once_per_opening(clock):
    breakers = Breakers(failure_threshold=2, open_seconds=2.0, clock=clock)
    opened: list[str] = []
    breakers.on_open = opened.append
    edge = breakers.get("edge-1")
    edge.failure()
    edge.failure()  # the threshold: it opens
    edge.trip("connection lost")  # a call that was in flight: open already
    breakers.get("edge-2").record(Verdict.DOWN)
    clock.now += 2.0
    assert edge.allow()
    edge.failure()  # the probe failed: open again
    assert opened == ["edge-1", "edge-2", "edge-1"]


def test_a_node_that_left_is_forgotten(clock):
    breakers = Breakers(clock=clock)
    breakers.get("edge-1").trip("gone")
    breakers.drop("edge-1")
    breakers.drop("never-seen")
    assert breakers.by_node == {} and breakers.blocked() == set()
