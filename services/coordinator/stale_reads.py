"""Registry reads kept past their lifetime (stale-if-error): an answer is fresh for `ttl_s`, then
served as it is while one read per key refreshes it in the background. A key never read, or one an
event changed, waits for its read (at most `timeout_s`); when the registry does not answer, what was
known stays in force (`registry_outage`), and only keys never read fail."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from services.coordinator.registry_outage import Outage, RegistryUnreachable, is_outage, what_failed

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Known(Generic[T]):
    """The last answer read for a key, or what an event made of it."""

    value: T
    fresh_until: float  # no read before then (after a failed one too: one read per ttl while away)
    changed: bool = False  # an event changed it: read again before it is used, while the registry answers


class StaleReads(Generic[T]):
    """The answers of `read` by key; `what(key)` names a key in errors ("model 'digits'")."""

    def __init__(self, read: Callable[[str], Awaitable[T]], ttl_s: float, timeout_s: float, outage: Outage,
                 what: Callable[[str], str]):
        self._read = read
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self.outage = outage
        self.what = what
        self._known: dict[str, Known[T]] = {}
        self._reading: dict[str, asyncio.Task[T]] = {}  # one read per key at a time

    def known(self, key: str) -> T | None:
        entry = self._known.get(key)
        return None if entry is None else entry.value

    async def get(self, key: str) -> T:
        """The answer for `key`: fresh, else the last known (refreshed in the background) unless an
        event changed it while the registry answers, else read now; RegistryUnreachable when the
        registry does not answer and nothing was known."""
        entry = self._known.get(key)
        now = time.monotonic()
        if entry is not None and not (entry.changed and not self.outage.down):
            if entry.fresh_until <= now:
                self._refresh(key)
            return entry.value
        try:
            return await asyncio.shield(self._refresh(key))
        except Exception as exc:
            if not is_outage(exc):
                raise
            entry = self._known.get(key)
            if entry is None:
                raise RegistryUnreachable(self.outage.target, self.what(key), what_failed(exc, self.timeout_s)) from None
            return entry.value

    def change(self, key: str = "", value: T | None = None) -> None:
        """An event changed `key` (every key when empty): read it again before its next use; `value`:
        what it is now as far as the event says, in force while the registry does not answer."""
        for k in [k for k in self._known if not key or k == key]:
            entry = self._known[k]
            self._known[k] = Known(entry.value if value is None else value, 0.0, changed=True)
        if key and value is not None and key not in self._known:
            self._known[key] = Known(value, 0.0, changed=True)
        for k in [k for k in self._reading if not key or k == key]:
            del self._reading[k]  # begun before the event: it may answer what the event changed

    async def close(self) -> None:
        reading = list(self._reading.values())
        for task in reading:
            task.cancel()
        await asyncio.gather(*reading, return_exceptions=True)

    def _refresh(self, key: str) -> asyncio.Task[T]:
        task = self._reading.get(key)
        if task is None:
            task = self._reading[key] = asyncio.create_task(self._read_and_keep(key), name=f"registry-read {key}")
            task.add_done_callback(lambda done: self._done(key, done))
        return task

    def _done(self, key: str, task: asyncio.Task[T]) -> None:
        if self._reading.get(key) is task:
            del self._reading[key]
        if not task.cancelled() and task.exception() is not None and not is_outage(task.exception()):
            log.debug("registry read of %s failed: %s", self.what(key), task.exception())

    async def _read_and_keep(self, key: str) -> T:
        try:
            value = await asyncio.wait_for(self._read(key), self.timeout_s)
        except Exception as exc:
            if is_outage(exc):
                self.outage.failed(what_failed(exc, self.timeout_s))
                entry = self._known.get(key)
                if entry is not None and self._current(key):
                    entry.fresh_until = time.monotonic() + self.ttl_s
            raise
        self.outage.answered()
        if self._current(key):
            self._known[key] = Known(value, time.monotonic() + self.ttl_s)
        return value

    def _current(self, key: str) -> bool:
        """Whether the running read is still the key's (no event changed it since it began)."""
        return self._reading.get(key) is asyncio.current_task()
