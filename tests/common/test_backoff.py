"""Waits through a spell of trouble: doubled up to their cap, ended once the trouble outlasts its limit."""
from __future__ import annotations

import math

from services.common.backoff import Backoff


def test_the_waits_double_up_to_their_cap_and_end_once_the_trouble_outlasts_the_limit():
    backoff = Backoff(first_s=1.0, max_s=8.0, limit_s=100.0)
    assert [backoff.next_wait(t) for t in (0, 1, 3, 7, 15, 23)] == [1, 2, 4, 8, 8, 8]
    assert backoff.next_wait(99.9) == 8 and backoff.next_wait(100.0) is None
    assert Backoff(first_s=1.0, max_s=30.0, limit_s=0.0).next_wait(5.0) is None  # 0: give up at once


def test_trouble_that_outlasts_a_thousand_waits_still_waits_the_cap():
    """A day's limit at 30 s waits is about 2,900 of them: the 1,025th wait once overflowed."""
    backoff = Backoff(first_s=1.0, max_s=30.0, limit_s=86_400.0)
    assert [backoff.next_wait(30.0 * n) for n in range(2_000)][-1000:] == [30.0] * 1000


def test_without_a_limit_the_waits_go_on_at_the_cap_and_count_from_the_first_error():
    backoff = Backoff(first_s=1.0, max_s=15.0)
    assert backoff.limit_s == math.inf and backoff.elapsed(5.0) == 0.0
    assert [backoff.next_wait(10.0 + n) for n in range(6)] == [1, 2, 4, 8, 15, 15]
    assert backoff.next_wait(1e9) == 15 and backoff.elapsed(20.0) == 10.0
