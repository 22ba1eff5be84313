"""Triton statistics summed over coordinator workers: each worker writes its own book to a file
in the directory the supervisor shares (atomically, when it changed), and answers a statistics
request with its live book plus the other workers' files, so a client comparing snapshots
taken on different connections (perf_analyzer does) sees one server."""
from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from services.common.stats import ModelStats, StatsBook, merge, stats_from_dict, stats_to_dict

log = logging.getLogger(__name__)
PREFIX = "stats-worker-"


def read_books(directory: str | Path, exclude: Path | None = None) -> list[ModelStats]:
    """Every worker's statistics as last written in `directory` (not summed)."""
    found = []
    for path in Path(directory).glob(f"{PREFIX}*.json"):
        if path == exclude:
            continue
        try:
            found += [stats_from_dict(d) for d in json.loads(path.read_text())]
        except (OSError, ValueError, KeyError) as exc:  # a worker mid-restart: skip its file
            log.debug("skipping statistics file %s: %s", path, exc)
    return found


class StatsShare:
    def __init__(self, directory: str, worker: int, book: StatsBook, interval_s: float = 0.1):
        self.dir = Path(directory)
        self.worker = worker
        self.book = book
        self.interval_s = interval_s
        self.path = self.dir / f"{PREFIX}{worker}.json"
        self._written = ""
        self._resume()

    def _resume(self) -> None:
        """A restarted worker carries on from what its predecessor wrote: counters never drop."""
        try:
            for s in (stats_from_dict(d) for d in json.loads(self.path.read_text())):
                self.book.put(s)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError) as exc:
            log.warning("could not resume statistics from %s: %s", self.path, exc)

    def write(self) -> None:
        text = json.dumps([stats_to_dict(s) for s in self.book.select()], sort_keys=True)
        if text == self._written:
            return
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, self.path)
        self._written = text

    def others(self) -> list[ModelStats]:
        return read_books(self.dir, exclude=self.path)

    def select(self, name: str = "", version: str = "") -> list[ModelStats]:
        parts = self.book.select() + self.others()
        return [s for s in merge(parts) if (not name or s.name == name) and (not version or s.version == version)]

    async def run(self) -> None:
        """Write the book every `interval_s` while it changes (cancel to stop)."""
        while True:
            try:
                self.write()
            except OSError as exc:
                log.warning("could not share statistics in %s: %s", self.dir, exc)
            await asyncio.sleep(self.interval_s)
