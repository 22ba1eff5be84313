"""Rolling latency windows (p50/p95/p99) per key, for hedging delays and the status page."""
from __future__ import annotations

from collections import deque

import numpy as np


class LatencyWindow:
    """The last `size` latencies in seconds; quantiles are recomputed every `refresh` samples
    (they sit on the request path for hedging)."""

    def __init__(self, size: int = 512, refresh: int = 32):
        self.samples: deque[float] = deque(maxlen=size)
        self.refresh = refresh
        self._added = 0
        self._cache: dict[float, float] = {}

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)
        self._added += 1
        if self._added % self.refresh == 0:
            self._cache.clear()

    def quantile(self, q: float) -> float | None:
        if not self.samples:
            return None
        if q not in self._cache or len(self.samples) < self.refresh:
            self._cache[q] = float(np.quantile(np.fromiter(self.samples, float), q))
        return self._cache[q]


class LatencyBook:
    def __init__(self, size: int = 512):
        self.size = size
        self.windows: dict[tuple[str, ...], LatencyWindow] = {}

    def add(self, key: tuple[str, ...], seconds: float) -> None:
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = LatencyWindow(self.size)
        window.add(seconds)

    def drop_node(self, node_id: str) -> None:
        """Forget the windows of a node that left (keys of (variant, node))."""
        for key in [key for key in self.windows if key[-1] == node_id]:
            del self.windows[key]

    def quantile(self, key: tuple[str, ...], q: float) -> float | None:
        window = self.windows.get(key)
        return window.quantile(q) if window else None
