"""Rate-limited log lines of something that repeats: the first at once, then a summary at most every interval."""
from __future__ import annotations

import pytest

from services.common.throttle import Summary, Throttle


def test_the_first_occurrence_is_logged_at_once_and_the_next_ones_a_summary_an_interval():
    throttle = Throttle(interval_s=60.0)
    lines = {t: throttle.note(t) for t in range(0, 130, 10)}
    assert {t: s for t, s in lines.items() if s} == {
        0: Summary(count=1, total=1, span_s=0.0, first=True),
        60: Summary(count=6, total=7, span_s=60.0, first=False),
        120: Summary(count=6, total=13, span_s=60.0, first=False)}


def test_several_occurrences_at_once_count_as_many():
    throttle = Throttle(interval_s=60.0)
    assert throttle.note(0.0, count=3) == Summary(3, 3, 0.0, True)
    assert throttle.note(1.0, count=4) is None
    assert throttle.note(61.0, count=2) == Summary(6, 9, 61.0, False)


@pytest.mark.parametrize(("notes", "ended"), [
    ([0.0, 5.0, 8.0], Summary(count=2, total=3, span_s=10.0, first=False)),
    ([0.0], Summary(count=0, total=1, span_s=10.0, first=False)),
    ([], None),
], ids=["some-not-logged", "all-logged", "no-spell"])
def test_the_end_of_a_spell_sums_up_what_was_not_logged_and_the_next_is_logged_at_once(notes, ended):
    throttle = Throttle(interval_s=60.0)
    for t in notes:
        throttle.note(t)
    assert throttle.end(10.0) == ended
    assert throttle.end(11.0) is None
    assert throttle.note(12.0) == Summary(1, 1, 0.0, True)
