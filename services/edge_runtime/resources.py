"""Node resource readings for heartbeats: CPU share in use (from /proc/stat deltas) and memory."""
from __future__ import annotations


def _cpu_times() -> tuple[int, int] | None:
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields), idle


class CpuSampler:
    """Share of CPU time spent busy since the previous call (0..1)."""

    def __init__(self) -> None:
        self._last = _cpu_times()

    def sample(self) -> float:
        now = _cpu_times()
        if now is None or self._last is None:
            return 0.0
        total, idle = now[0] - self._last[0], now[1] - self._last[1]
        self._last = now
        return 0.0 if total <= 0 else max(0.0, min(1.0, 1.0 - idle / total))


def memory_load() -> float:
    """Share of memory in use (1 - MemAvailable/MemTotal)."""
    values = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                values[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    total = values.get("MemTotal", 0)
    return 0.0 if not total else max(0.0, min(1.0, 1.0 - values.get("MemAvailable", total) / total))
