"""Circuit breaker state machine: closed -> open -> half-open (one probe) -> closed or open."""
from __future__ import annotations

import pytest

from services.common.errors import ErrorCode
from services.coordinator.breaker import BOOKED, NODE_VERDICTS, Breaker, Breakers, State, Verdict, verdict


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


def test_breakers_tell_of_each_breaker_that_opens_once_per_opening(clock):
    breakers = Breakers(failure_threshold=2, open_seconds=2.0, clock=clock)
    opened: list[tuple[str, str]] = []
    breakers.on_open = lambda node, model: opened.append((node, model))
    edge = breakers.get("edge-1")
    edge.failure()
    edge.failure()  # the threshold: it opens
    edge.trip("connection lost")  # a call that was in flight: open already
    breakers.get("edge-2").record(Verdict.DOWN)
    for _ in range(3):  # the third: its breaker of m is open already
        breakers.record("edge-2", "m:1:FP32", Verdict.FAULTY, "crashed")
    clock.now += 2.0
    assert edge.allow()
    edge.failure()  # the probe failed: open again
    assert opened == [("edge-1", ""), ("edge-2", ""), ("edge-2", "m:1:FP32"), ("edge-1", "")]


def test_a_node_that_left_is_forgotten_with_its_models_and_a_call_it_had_books_nothing(clock):
    breakers = Breakers(failure_threshold=1, clock=clock)
    in_flight = breakers.claim("edge-1", "m:1:FP32")
    breakers.get("edge-1").trip("gone")
    breakers.record("edge-1", "n:1:FP32", Verdict.FAULTY)
    breakers.record("edge-2", "n:1:FP32", Verdict.FAULTY)
    breakers.drop("edge-1")
    breakers.drop("never-seen")
    in_flight.settle(Verdict.FAULTY, "late")
    assert list(breakers.by_node) == ["edge-2"] and list(breakers.by_model) == [("edge-2", "n:1:FP32")]


# --- a model's own faults: its breaker on the node ----------------------------------------------

M, OTHER = "m:1:FP32", "other:1:FP32"


def test_every_verdict_is_booked_on_the_node_and_on_the_model_and_only_faults_and_timeouts_count_against_the_model():
    assert set(BOOKED) == set(Verdict)
    assert {v for v, (_, on_model) in BOOKED.items() if on_model is v} == \
        {Verdict.ANSWERED, Verdict.FAULTY, Verdict.SLOW, Verdict.SILENT}
    assert BOOKED[Verdict.FAULTY][0] is Verdict.ANSWERED, "a model's fault says the node is up"
    assert BOOKED[Verdict.SLOW][0] is Verdict.SILENT, "a model's timeout says nothing of the node"
    assert all(on_node is v for v, (on_node, _) in BOOKED.items() if v not in (Verdict.FAULTY, Verdict.SLOW))


def test_a_model_s_attempt_timeouts_open_its_breaker_on_that_node_alone(clock):
    breakers = Breakers(failure_threshold=2, open_seconds=2.0, clock=clock)
    for _ in range(2):
        breakers.claim("edge-1", M).settle(Verdict.SLOW, "node edge-1 did not answer in time")
    assert breakers.claim("edge-1", M) is None and breakers.claim("edge-1", OTHER) is not None
    assert breakers.get("edge-1").state is State.CLOSED and breakers.blocked() == set()
    assert breakers.why_blocked([M]) == {"edge-1": f"model {M}: node edge-1 did not answer in time"}


def test_a_model_s_faults_open_its_breaker_on_that_node_alone(clock):
    breakers = Breakers(failure_threshold=2, open_seconds=2.0, clock=clock)
    for _ in range(2):
        breakers.claim("edge-1", M).settle(Verdict.FAULTY, "onnx runtime: it broke")
    assert breakers.claim("edge-1", M) is None and not breakers.allows("edge-1", M)
    assert breakers.allows("edge-1", OTHER) and breakers.claim("edge-1", OTHER) is not None
    assert breakers.allows("edge-2", M)
    assert breakers.get("edge-1").state is State.CLOSED and breakers.blocked() == set()
    assert breakers.why_blocked() == {} and breakers.why_blocked([OTHER]) == {}
    assert breakers.why_blocked([M, OTHER]) == {"edge-1": f"model {M}: onnx runtime: it broke"}
    assert breakers.on_trial("edge-1", M) and not breakers.on_trial("edge-1", OTHER)
    assert breakers.reason("edge-1", M) == f"model {M}: onnx runtime: it broke" and breakers.reason("edge-1") == ""


def test_the_node_s_own_trouble_blocks_every_model_and_is_named_first(clock):
    breakers = Breakers(failure_threshold=1, open_seconds=2.0, clock=clock)
    breakers.record("edge-1", M, Verdict.FAULTY, "crashed")
    breakers.record("edge-1", OTHER, Verdict.DOWN, "connection lost")
    assert not breakers.allows("edge-1", OTHER) and breakers.claim("edge-1", "third:1:FP32") is None
    assert breakers.blocked() == {"edge-1"} and breakers.why_blocked([M]) == {"edge-1": "connection lost"}
    assert breakers.reason("edge-1", M) == "connection lost"


@pytest.mark.parametrize(("outcome", "node_failures", "model_failures"),
                         [(Verdict.ANSWERED, 0, None), (Verdict.FAULTY, 0, 2), (Verdict.SLOW, 1, 2),
                          (Verdict.DOWN, 1, 1), (Verdict.SILENT, 1, 1)])
def test_each_verdict_counts_on_the_breaker_it_says_something_of(clock, outcome, node_failures, model_failures):
    breakers = Breakers(failure_threshold=5, clock=clock)
    breakers.get("edge-1").failure("timed out")
    breakers.record("edge-1", M, Verdict.FAULTY, "crashed")  # a fault: the node answered, its count reset
    breakers.get("edge-1").failure("timed out")
    breakers.record("edge-1", M, outcome)
    assert breakers.get("edge-1").failures == node_failures
    pair = breakers.by_model.get(("edge-1", M))
    assert (pair.failures if pair else None) == model_failures, "a model answering again is not kept"


def test_a_call_without_a_model_books_its_fault_on_the_node(clock):
    breakers = Breakers(failure_threshold=1, clock=clock)
    breakers.claim("edge-1").settle(Verdict.FAULTY, "crashed")
    assert breakers.get("edge-1").state is State.OPEN and breakers.by_model == {}


def test_a_model_s_half_open_breaker_lets_one_probe_of_it_through_and_the_node_s_other_models(clock):
    breakers = Breakers(failure_threshold=1, open_seconds=2.0, clock=clock)
    breakers.record("edge-1", M, Verdict.FAULTY, "crashed")
    clock.now += 2.0
    assert breakers.allows("edge-1", M)
    probe = breakers.claim("edge-1", M)
    assert probe.model_probe and not probe.probe and breakers.claim("edge-1", M) is None
    other = breakers.claim("edge-1", OTHER)
    assert other is not None and not other.model_probe
    probe.settle(Verdict.SILENT)  # its client gave up: the next call probes
    again = breakers.claim("edge-1", M)
    assert again.model_probe
    again.settle(Verdict.ANSWERED)
    assert breakers.by_model == {} and breakers.claim("edge-1", M) is not None


def test_a_failed_probe_of_a_model_opens_its_breaker_for_a_new_period(clock):
    breakers = Breakers(failure_threshold=3, open_seconds=2.0, clock=clock)
    for _ in range(3):
        breakers.record("edge-1", M, Verdict.FAULTY)
    clock.now += 2.0
    breakers.claim("edge-1", M).settle(Verdict.FAULTY, "still broken")
    pair = breakers.by_model[("edge-1", M)]
    assert pair.state is State.OPEN and pair.opened_at == clock.now and pair.reason == "still broken"


def test_a_node_s_faults_are_listed_by_model():
    breakers = Breakers(failure_threshold=2)
    breakers.record("edge-1", OTHER, Verdict.FAULTY)
    breakers.record("edge-1", M, Verdict.FAULTY)
    breakers.record("edge-1", M, Verdict.FAULTY)
    breakers.record("edge-2", M, Verdict.FAULTY)
    faults = breakers.faults("edge-1")
    assert list(faults) == [M, OTHER] and [b.state for b in faults.values()] == [State.OPEN, State.CLOSED]
