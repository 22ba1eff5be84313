"""A runtime's L1 model cache: the loaded sessions in memory, least recently used leaving first
beyond a byte budget."""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from prometheus_client import Counter, Gauge

CACHE_EVENTS = Counter("cnei_model_cache_events_total", "L1 model cache events", ["event"])
_HITS = CACHE_EVENTS.labels("hit")  # every request looks up its model: bound once
CACHE_BYTES = Gauge("cnei_model_cache_bytes", "Bytes of models loaded in the L1 cache")


class L1Cache:
    """Loaded models keyed by variant key, evicting least-recently-used beyond a byte budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()

    @property
    def bytes_used(self) -> int:
        return sum(size for _, size in self._items.values())

    def keys(self) -> list[str]:
        return list(self._items)

    def values(self) -> list[Any]:
        """Everything loaded, without touching LRU order or the hit/miss counters."""
        return [value for value, _ in self._items.values()]

    def peek(self, key: str) -> Any | None:
        """The value, without touching LRU order or the hit/miss counters."""
        item = self._items.get(key)
        return None if item is None else item[0]

    def get(self, key: str) -> Any | None:
        item = self._items.get(key)
        if item is None:
            CACHE_EVENTS.labels("miss").inc()
            return None
        self._items.move_to_end(key)
        _HITS.inc()
        return item[0]

    def put(self, key: str, value: Any, size: int) -> dict[str, Any]:
        """Insert; what was evicted to stay within the budget (never the new one), by key, least
        recently used first."""
        self._items[key] = (value, size)
        self._items.move_to_end(key)
        evicted = {}
        while self.bytes_used > self.max_bytes and len(self._items) > 1:
            old, (value, _) = self._items.popitem(last=False)
            evicted[old] = value
            CACHE_EVENTS.labels("eviction").inc()
        CACHE_BYTES.set(self.bytes_used)
        return evicted

    def remove(self, key: str) -> Any | None:
        """Take the item out: its value (None when it was not here)."""
        item = self._items.pop(key, None)
        CACHE_BYTES.set(self.bytes_used)
        return None if item is None else item[0]
