"""A bounded on-disk outbox: events kept in order while NATS is unreachable, flushed later.

Bounded by events and, optionally, by bytes (the file's size): an event that would take it over
either bound first drops the oldest kept (`cnei_outbox_dropped_total`, an error logged); an event
larger than the byte bound by itself is not kept at all (counted and logged alike). The newest
events win (a runtime's metrics snapshots hold cumulative counts: the latest says what the
dropped ones did, less their intermediate samples), and no drop is silent."""
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
OUTBOX_BYTES = Gauge("cnei_outbox_bytes", "Bytes of the events waiting in the on-disk outbox")
OUTBOX_DROPPED = Counter("cnei_outbox_dropped_total",
                         "Events dropped because the outbox was full (its oldest, or one larger than its byte bound)")


class Entry(NamedTuple):
    """A kept event and its sequence number (its place among every event ever kept)."""

    seq: int
    subject: str
    envelope: events.Envelope


class Outbox:
    """Append-only JSON-lines file of envelopes; `peek`/`pop` consume from the front in order.
    At most `max_events` events and `max_bytes` bytes of them (0: no byte bound) are kept, the
    oldest dropped first (a file a larger bound left is cut down when it is opened); the file
    takes up to twice `max_bytes` while it is rewritten."""

    def __init__(self, path: str | Path, max_events: int = 100_000, max_bytes: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_events, self.max_bytes = max_events, max_bytes
        self._lock = threading.Lock()
        self._items: list[str] = self._load()
        self._bytes = sum(_size(line) for line in self._items)
        self._head = 0  # the sequence number of _items[0]: how many events left the front
        if self._trim():
            self._rewrite()
        self._gauge()

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
        if 0 < self.max_bytes < _size(line):
            OUTBOX_DROPPED.inc()
            log.error("outbox: dropping a %s event of %d bytes, over the outbox's bound of %d bytes",
                      subject, _size(line), self.max_bytes)
            return
        with self._lock:
            self._items.append(line)
            self._bytes += _size(line)
            with self.path.open("a") as fh:
                fh.write(line + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            if self._trim():
                self._rewrite()
            self._gauge()

    def _trim(self) -> int:
        """Drop the oldest events beyond the bounds (counted and logged); how many went."""
        drop, freed = 0, 0
        while len(self._items) - drop > self.max_events or 0 < self.max_bytes < self._bytes - freed:
            freed += _size(self._items[drop])
            drop += 1
        if drop:
            OUTBOX_DROPPED.inc(drop)
            log.error("outbox full (%d events, %d bytes at most): dropping %d oldest events", self.max_events,
                      self.max_bytes, drop)
            self._items = self._items[drop:]
            self._bytes -= freed
            self._head += drop
        return drop

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
            self._bytes -= sum(_size(line) for line in self._items[:count])
            self._items = self._items[count:]
            self._head += count
            self._rewrite()
            self._gauge()

    def _gauge(self) -> None:
        OUTBOX_DEPTH.set(len(self._items))
        OUTBOX_BYTES.set(self._bytes)

    def _rewrite(self) -> None:
        temp = self.path.with_name(self.path.name + ".tmp")  # a worker's outbox.jsonl.<index>: its own
        temp.write_text("".join(line + "\n" for line in self._items))
        os.replace(temp, self.path)


def _size(line: str) -> int:
    """Bytes the kept line takes in the file (JSON with ASCII escapes, and its newline)."""
    return len(line) + 1


def _parse(line: str) -> tuple[str, events.Envelope]:
    obj = json.loads(line)
    return obj["subject"], events.decode(json.dumps(obj["envelope"]).encode())
