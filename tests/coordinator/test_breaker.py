"""Circuit breaker state machine: closed -> open -> half-open (one probe) -> closed or open."""
from __future__ import annotations

import pytest

from services.coordinator.breaker import Breaker, Breakers, State


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
