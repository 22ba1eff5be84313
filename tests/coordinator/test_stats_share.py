"""Statistics summed over coordinator workers through the shared directory."""
from __future__ import annotations

from services.common.stats import StatsBook, merge, stats_from_dict, stats_to_dict
from services.coordinator.stats_share import StatsShare


def _book(*records) -> StatsBook:
    book = StatsBook()
    for name, total_ns, batch in records:
        book.get(name, "1").record(True, total_ns, batch, queue_ns=10, compute_ns=100)
    return book


def test_a_stats_record_survives_the_round_trip_through_a_dict():
    s = _book(("digits", 1000, 4)).select()[0]
    assert stats_from_dict(stats_to_dict(s)) == s


def test_merge_sums_counts_durations_and_batch_sizes_per_model_version():
    merged = merge(_book(("digits", 1000, 4), ("digits", 500, 1)).select() + _book(("digits", 700, 4)).select())
    assert len(merged) == 1
    s = merged[0]
    assert (s.inference_count, s.execution_count) == (9, 3)
    assert (s.success.count, s.success.ns) == (3, 2200)
    assert (s.batches[4].count, s.batches[1].count) == (2, 1)


def test_each_worker_answers_with_everyone_s_statistics(tmp_path):
    a, b = _book(("digits", 1000, 1)), _book(("digits", 3000, 2), ("wide", 10, 1))
    share_a, share_b = StatsShare(str(tmp_path), 0, a), StatsShare(str(tmp_path), 1, b)
    share_a.write()
    share_b.write()
    digits = share_a.select("digits")[0]
    assert (digits.execution_count, digits.inference_count) == (2, 3)
    assert {s.name for s in share_b.select()} == {"digits", "wide"}
    assert share_b.select("digits")[0].success.ns == 4000


def test_a_restarted_worker_carries_on_from_its_predecessors_counts(tmp_path):
    first = StatsShare(str(tmp_path), 1, _book(("digits", 1000, 1), ("digits", 1000, 1)))
    first.write()
    book = StatsBook()
    StatsShare(str(tmp_path), 1, book)  # the replacement worker starts
    book.get("digits", "1").record(True, 500)
    assert book.select("digits")[0].execution_count == 3
