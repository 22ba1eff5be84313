"""Per-model inference statistics (Triton's statistics extension) kept in memory."""
from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass
class ModelStats:
    name: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)  # lookups that answered (response cache)
    cache_miss: Duration = field(default_factory=Duration)  # lookups that did not, and the insert
    batches: dict[int, Duration] = field(default_factory=dict)

    def record(self, ok: bool, total_ns: int, batch: int = 1, queue_ns: int = 0, compute_ns: int = 0,
               executed: bool = True, cache_hit: bool = False) -> None:
        """One request's outcome. `executed` False: its execution is booked apart (`execution`:
        the batch it rode in); `cache_hit`: answered from the response cache, the model never ran
        it, so (as Triton counts) it is a success and passed the queue but adds no inferences."""
        self.last_inference_ms = int(time.time() * 1000)
        if not ok:
            self.fail.add(total_ns)
            return
        self.success.add(total_ns)
        self.queue.add(queue_ns)  # every request passes the queue (Triton counts them all there)
        if cache_hit:
            return
        self.inference_count += batch
        if executed:
            self.execution(batch, compute_ns)

    def execution(self, batch: int, compute_ns: int) -> None:
        """One model execution of `batch` rows (a batch that carried several requests, each
        recorded with `executed=False`, is one execution)."""
        self.execution_count += 1
        self.compute_infer.add(compute_ns)
        self.batches.setdefault(batch, Duration()).add(compute_ns)


class StatsBook:
    """ModelStats per (model, version)."""

    def __init__(self) -> None:
        self._stats: dict[tuple[str, str], ModelStats] = {}
        self._defaults: dict[str, str] = {}  # model -> the version its requests naming none last went to

    def get(self, name: str, version: str, by_default: bool = False) -> ModelStats:
        """The version's statistics; `by_default`: a request that named no version is served by
        it (what `failed` counts such a request against when it fails before that is known)."""
        key = (name, version)
        if key not in self._stats:
            self._stats[key] = ModelStats(name, version)
        if by_default:
            self._defaults[name] = version
        return self._stats[key]

    def failed(self, name: str, version: str = "") -> ModelStats | None:
        """Where a request for model `name` that failed before its version was worked out (the
        registry away, the model unloaded, a malformed request) counts: the `version` it names,
        or when it names none the version such requests last went to; None for a model version
        this book does not hold (one never served here, or a name no model has), so that names
        clients make up add no series."""
        return self._stats.get((name, version or self._defaults.get(name, "")))

    def put(self, stats: ModelStats) -> None:
        self._stats[(stats.name, stats.version)] = stats

    def select(self, name: str = "", version: str = "") -> list[ModelStats]:
        return [s for (n, v), s in sorted(self._stats.items())
                if (not name or n == name) and (not version or v == version)]


DURATIONS = ("success", "fail", "queue", "compute_infer", "cache_hit", "cache_miss")  # the Duration fields of ModelStats


def stats_to_dict(s: ModelStats) -> dict:
    return {"name": s.name, "version": s.version, "last_inference_ms": s.last_inference_ms,
            "inference_count": s.inference_count, "execution_count": s.execution_count,
            **{k: [getattr(s, k).count, getattr(s, k).ns] for k in DURATIONS},
            "batches": {str(size): [d.count, d.ns] for size, d in s.batches.items()}}


def stats_from_dict(d: dict) -> ModelStats:
    s = ModelStats(d["name"], d["version"], d["last_inference_ms"], d["inference_count"], d["execution_count"])
    for key in DURATIONS:
        setattr(s, key, Duration(*d.get(key, (0, 0))))
    s.batches = {int(size): Duration(*pair) for size, pair in d["batches"].items()}
    return s


def merge(parts: list[ModelStats]) -> list[ModelStats]:
    """Sum statistics of the same (model, version) from several processes."""
    out: dict[tuple[str, str], ModelStats] = {}
    for p in parts:
        s = out.setdefault((p.name, p.version), ModelStats(p.name, p.version))
        s.last_inference_ms = max(s.last_inference_ms, p.last_inference_ms)
        s.inference_count += p.inference_count
        s.execution_count += p.execution_count
        for key in DURATIONS:
            mine, theirs = getattr(s, key), getattr(p, key)
            mine.count, mine.ns = mine.count + theirs.count, mine.ns + theirs.ns
        for size, d in p.batches.items():
            b = s.batches.setdefault(size, Duration())
            b.count, b.ns = b.count + d.count, b.ns + d.ns
    return [out[k] for k in sorted(out)]
