"""The pure maths of `make bench-batching`: which batch the tail request ran in, its compute
time, and the spike verdict."""
from __future__ import annotations

import pytest

from bench.batching import batch_delta, compute_ms, request_percentile_batch, spikes


def test_only_batches_run_between_two_snapshots_count():
    before = {1: (10, 10_000_000), 4: (2, 8_000_000)}
    after = {1: (12, 12_000_000), 4: (2, 8_000_000), 8: (1, 5_000_000)}
    assert batch_delta(before, after) == {1: (2, 2_000_000), 8: (1, 5_000_000)}


def test_the_tail_batch_is_counted_by_requests_not_executions():
    # 90 lone requests and 2 batches of 8: 16 of 106 requests (15 %) ran in a batch of 8.
    batches = {1: (90, 90_000_000), 8: (2, 6_000_000)}
    assert request_percentile_batch(batches, 50) == 1
    assert request_percentile_batch(batches, 90) == 8
    assert request_percentile_batch(batches, 99) == 8


def test_compute_time_is_the_mean_of_that_size_or_the_largest_below_it():
    batches = {1: (4, 8_000_000), 4: (2, 6_000_000)}
    assert compute_ms(batches, 4) == pytest.approx(3.0)
    assert compute_ms(batches, 3) == pytest.approx(2.0)
    assert compute_ms({}, 1) is None


def _row(setup: str, rate: float, excess: float) -> dict:
    return {"setup": setup, "rate": rate, "excess_ms": excess}


def test_a_batched_point_spikes_when_its_tail_exceeds_the_unbatched_serving_constant():
    rows = [_row("unbatched", 50, 6.0), _row("unbatched", 400, 900.0), _row("greedy", 50, 6.5),
            _row("greedy", 400, 7.5), _row("delay-2ms", 400, 12.0)]
    verdict = spikes(rows, slack_ms=1.0)
    assert (verdict["constant_ms"], verdict["limit_ms"]) == (6.0, 7.0)
    assert verdict["within"] == ["greedy@50"]
    assert verdict["spiked"] == ["greedy@400", "delay-2ms@400"]
    assert spikes([_row("greedy", 50, 1.0)], slack_ms=1.0) == {}
