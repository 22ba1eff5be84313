"""CPU seconds per process (Linux /proc) around a perf_analyzer run: where each request's CPU
goes on a machine whose client and servers share the cores."""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass, field
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def process_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process, all its threads (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14 and 15)


def children_seconds() -> float:
    """CPU seconds of this process's children that were waited for (perf_analyzer runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def descendants(pid: int) -> list[int]:
    """Every live process under `pid` (e.g. a coordinator's front door)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@dataclass
class CpuBook:
    """CPU seconds of named process groups, and of waited-for children ("client"), between
    `start` and `per_request`."""

    groups: dict[str, list[int]]
    _start: dict[str, float] = field(default_factory=dict)

    def _now(self) -> dict[str, float]:
        now = {name: sum(process_seconds(p) for p in pids) for name, pids in self.groups.items()}
        now["client"] = children_seconds()
        return now

    def start(self) -> None:
        self._start = self._now()

    def per_request(self, requests: int) -> dict[str, float]:
        """µs of CPU per request of each group since `start` (empty without requests)."""
        if requests <= 0:
            return {}
        now = self._now()
        return {name: round((now[name] - self._start[name]) / requests * 1e6, 1) for name in now}
