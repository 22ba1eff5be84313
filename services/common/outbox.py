"""A bounded on-disk outbox: events kept in order while NATS is unreachable, flushed later.

Bounded by events and, optionally, by bytes (the kept events' lines): an event that would take it
over either bound first drops the oldest kept (`cnei_outbox_dropped_total`); an event larger
than the byte bound by itself is not kept at all (counted alike). The newest events win (a
runtime's metrics snapshots hold cumulative counts: the latest says what the dropped ones did,
less their intermediate samples). Every drop is counted, none is silent, but a long outage must
not log a line per event: the first drop of a spell is logged at once, then at most one summary a
minute (`throttle.Throttle`), and a pop (events delivered: room again) sums the spell up.

On disk: `<path>`, JSON lines only ever appended to (each fsynced; a file of the previous format,
which rewrote it whole, is one with nothing sent), and `<path>.head`, the byte offset where the
kept events start (the lines before it were sent or dropped) with a digest of the line ending
there, written over in place (~60 bytes) by each pop or drop. The front is cut away (the kept
lines copied to `<path>.tmp`, fsynced and renamed over the file, then the head file removed) once
it outgrows the kept lines or the file outgrows 1.5 × max_bytes: a cut copies at most twice the
bytes it removes, so an event costs its own bytes and at most twice them again, not the file.
Between operations the file stays within 1.5 × max_bytes (and twice the kept events); an append
takes it one event over, a cut's copy up to max_bytes more while it is written. A head file that
does not match the file (a crash after a cut's rename, a torn record) is ignored, logged: the
events before it are given again, never lost; a torn last line (a crash while it was appended)
is cut off, logged."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import BinaryIO, Callable, NamedTuple

from prometheus_client import Counter, Gauge

from services.common import events
from services.common.throttle import Throttle

log = logging.getLogger(__name__)
OUTBOX_DEPTH = Gauge("cnei_outbox_events", "Events waiting in the on-disk outbox")
OUTBOX_BYTES = Gauge("cnei_outbox_bytes", "Bytes of the events waiting in the on-disk outbox")
OUTBOX_DROPPED = Counter("cnei_outbox_dropped_total",
                         "Events dropped because the outbox was full (its oldest, or one larger than its byte bound)")
READ_BACK = 1 << 16  # bytes read at a time looking back for the end of the last whole line
DROP_LOG_INTERVAL_S = 60.0  # after a spell's first drop, at most one summary line this often


class Entry(NamedTuple):
    """A kept event and its sequence number (its place among every event ever kept)."""

    seq: int
    subject: str
    envelope: events.Envelope


class Outbox:
    """Append-only JSON-lines file of envelopes; `peek`/`pop` consume from the front in order.
    At most `max_events` events and `max_bytes` bytes of them (0: no byte bound) are kept, the
    oldest dropped first (a file a larger bound left is cut down when it is opened). A kept event
    is on disk (fsynced) when `put` returns; a pop or a drop is written when it returns, not
    fsynced (as the whole file was before): a killed process gives no popped event again, a power
    cut may (at least once: subscribers and JetStream drop repeats by envelope id)."""

    def __init__(self, path: str | Path, max_events: int = 100_000, max_bytes: int = 0,
                 clock: Callable[[], float] = time.monotonic):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self.max_events, self.max_bytes = max_events, max_bytes
        self._lock = threading.Lock()
        self._clock = clock  # times the drops' log lines
        self._full = Throttle(DROP_LOG_INTERVAL_S)  # the oldest dropped to make room: a spell ends at a pop
        self._oversize = Throttle(DROP_LOG_INTERVAL_S)  # events larger than max_bytes alone
        self._lines: deque[bytes] = deque()  # the kept events' lines, oldest first, without newlines
        self._front = 0  # where in the file the kept lines start: the bytes before were sent or dropped
        self._bytes = 0  # bytes the kept lines take in the file (newlines counted)
        self._first_seq = 0  # the sequence number of _lines[0]: how many events left the front
        irregular = self._load()
        self._settle(self._trim(), cut=irregular)
        self._gauge()

    def _load(self) -> bool:
        """Read the kept lines (after a torn last line is cut off); True when some were unreadable."""
        if not self.path.exists():
            self.head_path.unlink(missing_ok=True)
            return False
        with self.path.open("r+b") as fh:
            _cut_torn_tail(fh, self.path)
            self._front = _read_head(self.head_path, fh)
            fh.seek(self._front)
            lines = fh.read().split(b"\n")[:-1]
        irregular = False
        for line in lines:
            try:
                _parse(line)
            except (ValueError, KeyError, TypeError):
                log.warning("skipping a corrupt outbox line in %s", self.path)
                irregular = True
                continue
            self._lines.append(line)
            self._bytes += len(line) + 1
        return irregular

    def __len__(self) -> int:
        return len(self._lines)

    def put(self, subject: str, envelope: events.Envelope) -> None:
        line = json.dumps({"subject": subject, "envelope": asdict(envelope)}, separators=(",", ":")).encode()
        with self._lock:
            if 0 < self.max_bytes < len(line) + 1:
                self._drop_oversize(subject, len(line) + 1)
                return
            self._append(line + b"\n")
            self._lines.append(line)
            self._bytes += len(line) + 1
            self._settle(self._trim())
            self._gauge()

    def _append(self, data: bytes) -> None:
        """Write `data` at the end of the file and fsync it; a failed write is cut off again."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            end, view = os.fstat(fd).st_size, memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, end)
            except OSError:
                log.warning("outbox: could not cut a failed write off %s", self.path)
            raise
        finally:
            os.close(fd)

    def _trim(self) -> bytes | None:
        """Drop the oldest events beyond the bounds (counted and logged); the last line dropped."""
        drop, last = 0, None
        while len(self._lines) > self.max_events or 0 < self.max_bytes < self._bytes:
            last = self._take_front()
            drop += 1
        if drop:
            OUTBOX_DROPPED.inc(drop)
            if summary := self._full.note(self._clock(), drop):
                if summary.first:
                    log.error("outbox full (%d events, %d bytes at most): dropping %d oldest events (until it has "
                              "room again, further drops are summed up at most every %.0f s)", self.max_events,
                              self.max_bytes, drop, DROP_LOG_INTERVAL_S)
                else:
                    log.error("outbox still full: dropped %d events in the last %.0f s, %d in all since it filled",
                              summary.count, summary.span_s, summary.total)
        return last

    def _drop_oversize(self, subject: str, size: int) -> None:
        """An event larger than the byte bound alone: not kept, counted and logged (rate-limited)."""
        OUTBOX_DROPPED.inc()
        if summary := self._oversize.note(self._clock()):
            if summary.first:
                log.error("outbox: dropping a %s event of %d bytes, over the outbox's bound of %d bytes (further "
                          "ones are summed up at most every %.0f s)", subject, size, self.max_bytes,
                          DROP_LOG_INTERVAL_S)
            else:
                log.error("outbox: dropped %d events over its bound of %d bytes in the last %.0f s, %d in all",
                          summary.count, self.max_bytes, summary.span_s, summary.total)

    def _has_room(self) -> None:
        """Events were delivered: a spell of drops for want of room is over, summed up."""
        if summary := self._full.end(self._clock()):
            log.warning("outbox has room again (events delivered): %d events dropped while it was full, %d of them "
                        "since the last line %.0f s ago", summary.total, summary.count, summary.span_s)

    def _take_front(self) -> bytes:
        line = self._lines.popleft()
        self._front += len(line) + 1
        self._bytes -= len(line) + 1
        self._first_seq += 1
        return line

    def peek(self, count: int = 100) -> list[Entry]:
        """The oldest `count` events, oldest first."""
        with self._lock:
            front, first = list(islice(self._lines, count)), self._first_seq
        return [Entry(first + i, *_parse(line)) for i, line in enumerate(front)]

    def pop(self, through: int) -> None:
        """Remove the events up to sequence number `through` (delivered) that are still kept: a
        full outbox may have dropped some of them meanwhile, and the ones after stay."""
        with self._lock:
            count = min(through + 1 - self._first_seq, len(self._lines))
            if count <= 0:
                return
            for _ in range(count):
                last = self._take_front()
            self._settle(last)
            self._has_room()
            self._gauge()

    def _gauge(self) -> None:
        OUTBOX_DEPTH.set(len(self._lines))
        OUTBOX_BYTES.set(self._bytes)

    def _settle(self, last: bytes | None, cut: bool = False) -> None:
        """Put the front on disk after `last` (the line that left it last, if any left), then cut
        it away when asked, when it has grown past the kept lines, or the file past 1.5 × the byte bound."""
        if last is not None:
            _write_head(self.head_path, self._front, last)
        if cut or self._front > self._bytes or 0 < 3 * self.max_bytes < 2 * (self._front + self._bytes):
            try:
                self._cut_front()
            except OSError as exc:  # a full disk: the front stays, cut at the next try
                log.warning("outbox: could not cut the sent and dropped events off %s: %s", self.path, exc)

    def _cut_front(self) -> None:
        """The kept lines alone in a fresh file renamed over the old one; the head file goes after."""
        temp = self.path.with_name(self.path.name + ".tmp")
        try:
            with temp.open("wb") as fh:
                fh.writelines(line + b"\n" for line in self._lines)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError:
            temp.unlink(missing_ok=True)
            raise
        os.replace(temp, self.path)
        self.head_path.unlink(missing_ok=True)  # a crash before this leaves one that matches nothing: ignored
        self._front = 0


def _cut_torn_tail(fh: BinaryIO, path: Path) -> None:
    """Cut off a last line with no newline (a crash while it was appended), with a warning."""
    size = fh.seek(0, os.SEEK_END)
    end = size
    while end > 0:
        start = max(0, end - READ_BACK)
        fh.seek(start)
        newline = fh.read(end - start).rfind(b"\n")
        if newline >= 0:
            end = start + newline + 1
            break
        end = start
    if end < size:
        log.warning("outbox: cutting a torn last line (%d bytes) off %s: a crash while it was written",
                    size - end, path)
        fh.truncate(end)


def _write_head(path: Path, end: int, last: bytes) -> None:
    """Overwrite the head record in place: the front ends at `end`, after the line `last`."""
    record = {"end": end, "start": end - len(last) - 1, "line": _digest(last)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
    try:  # its first line is read: a longer record's tail after it is left, unread
        os.pwrite(fd, json.dumps(record, separators=(",", ":")).encode() + b"\n", 0)
    finally:
        os.close(fd)


def _read_head(path: Path, fh: BinaryIO) -> int:
    """Where the kept events start in the open file: the head record's offset when the line it
    names ends there, else 0 (every event in the file kept: some may be sent again)."""
    try:
        record = json.loads(path.read_bytes().split(b"\n", 1)[0])
        end, start, digest = int(record["end"]), int(record["start"]), str(record["line"])
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("outbox: ignoring an unreadable head record %s: every event in the file is kept", path)
        return 0
    if 0 <= start < end:
        fh.seek(start)
        line = fh.read(end - start)
        if line.endswith(b"\n") and _digest(line[:-1]) == digest:
            return end
    log.warning("outbox: ignoring a head record %s that does not match the file (left by a crash while its "
                "front was cut away): every event in the file is kept", path)
    return 0


def _digest(line: bytes) -> str:
    return hashlib.blake2b(line, digest_size=8).hexdigest()


def _parse(line: bytes) -> tuple[str, events.Envelope]:
    obj = json.loads(line)
    return obj["subject"], events.decode(json.dumps(obj["envelope"]).encode())
