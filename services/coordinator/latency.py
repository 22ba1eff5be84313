"""Rolling latency windows (p50/p95/p99) per key, for hedging delays and the status page."""
from __future__ import annotations

from collections import deque

import numpy as np


class LatencyWindow:
    """The last `size` latencies in seconds."""

    def __init__(self, size: int = 512):
        self.samples: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self.samples.append(seconds)

    def quantile(self, q: float) -> float | None:
        if not self.samples:
            return None
        return float(np.quantile(np.fromiter(self.samples, float), q))


class LatencyBook:
    def __init__(self, size: int = 512):
        self.size = size
        self.windows: dict[tuple[str, ...], LatencyWindow] = {}

    def add(self, key: tuple[str, ...], seconds: float) -> None:
        window = self.windows.get(key)
        if window is None:
            window = self.windows[key] = LatencyWindow(self.size)
        window.add(seconds)

    def quantile(self, key: tuple[str, ...], q: float) -> float | None:
        window = self.windows.get(key)
        return window.quantile(q) if window else None
