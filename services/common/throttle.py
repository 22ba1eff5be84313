"""Log lines of something that repeats, rate-limited: the first at once, then at most one summary per interval."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """What to log now: `count` occurrences since the last line (this one's included), over
    `span_s` seconds (0 for a spell's first line), `total` since the spell began."""

    count: int
    total: int
    span_s: float
    first: bool


class Throttle:
    """Counts the occurrences of one repeated thing through a spell of it (from the first
    occurrence until `end`) and says when to log them: the spell's first at once, then at most one
    summary every `interval_s` seconds of the ones since the last line. Pure: the caller passes
    the time (any clock that only goes forward) and does the logging."""

    def __init__(self, interval_s: float = 60.0):
        self.interval_s = interval_s
        self._since_line = 0  # occurrences not logged yet
        self._total = 0  # occurrences in this spell
        self._line_at: float | None = None  # when the spell's last line was logged; None: no spell

    def note(self, now: float, count: int = 1) -> Summary | None:
        """`count` more occurrences at `now`; a Summary when a line is due, else None (counted)."""
        self._since_line += count
        self._total += count
        if self._line_at is not None and now - self._line_at < self.interval_s:
            return None
        first = self._line_at is None
        return self._line(now, 0.0 if first else now - self._line_at, first)

    def end(self, now: float) -> Summary | None:
        """The spell is over (the next occurrence logs at once again): what it held since the last
        line, to log once more; None when no spell was under way."""
        if self._line_at is None:
            return None
        summary = self._line(now, now - self._line_at, False)
        self._total, self._line_at = 0, None
        return summary

    def _line(self, now: float, span_s: float, first: bool) -> Summary:
        summary = Summary(self._since_line, self._total, span_s, first)
        self._since_line, self._line_at = 0, now
        return summary
