"""A bounded on-disk outbox: events kept in order while NATS is unreachable, flushed later."""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

from prometheus_client import Counter, Gauge

from services.common import events

log = logging.getLogger(__name__)
OUTBOX_DEPTH = Gauge("cnei_outbox_events", "Events waiting in the on-disk outbox")
OUTBOX_DROPPED = Counter("cnei_outbox_dropped_total", "Oldest events dropped because the outbox was full")


class Entry(NamedTuple):
    """A kept event and its sequence number (its place among every event ever kept)."""

    seq: int
    subject: str
    envelope: events.Envelope


class Outbox:
    """Append-only JSON-lines file of envelopes; `peek`/`pop` consume from the front in order."""

    def __init__(self, path: str | Path, max_events: int = 100_000):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_events = max_events
        self._lock = threading.Lock()
        self._items: list[str] = self._load()
        self._head = 0  # the sequence number of _items[0]: how many events left the front
        OUTBOX_DEPTH.set(len(self._items))

    def _load(self) -> list[str]:
        if not self.path.exists():
            return []
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        valid = []
        for line in lines:
            try:
                _parse(line)
                valid.append(line)
            except (ValueError, KeyError, TypeError):
                log.warning("skipping a corrupt outbox line in %s", self.path)
        return valid

    def __len__(self) -> int:
        return len(self._items)

    def put(self, subject: str, envelope: events.Envelope) -> None:
        line = json.dumps({"subject": subject, "envelope": asdict(envelope)}, separators=(",", ":"))
        with self._lock:
            self._items.append(line)
            with self.path.open("a") as fh:
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            if len(self._items) > self.max_events:
                drop = len(self._items) - self.max_events
                OUTBOX_DROPPED.inc(drop)
                log.error("outbox full: dropping %d oldest events", drop)
                self._items = self._items[drop:]
                self._head += drop
                self._rewrite()
            OUTBOX_DEPTH.set(len(self._items))

    def peek(self, count: int = 100) -> list[Entry]:
        """The oldest `count` events, oldest first."""
        with self._lock:
            front, head = self._items[:count], self._head
        return [Entry(head + i, *_parse(line)) for i, line in enumerate(front)]

    def pop(self, through: int) -> None:
        """Remove the events up to sequence number `through` (delivered) that are still kept: a
        full outbox may have dropped some of them meanwhile, and the ones after stay."""
        with self._lock:
            count = min(through + 1 - self._head, len(self._items))
            if count <= 0:
                return
            self._items = self._items[count:]
            self._head += count
            self._rewrite()
            OUTBOX_DEPTH.set(len(self._items))

    def _rewrite(self) -> None:
        temp = self.path.with_suffix(".tmp")
        temp.write_text("".join(line + "\n" for line in self._items))
        os.replace(temp, self.path)


def _parse(line: str) -> tuple[str, events.Envelope]:
    obj = json.loads(line)
    return obj["subject"], events.decode(json.dumps(obj["envelope"]).encode())
