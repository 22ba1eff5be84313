"""Something made from files (TLS credentials), made again when the files change: renewed
certificates are taken without a restart, and files that change but do not load leave the last
good ones in use, logged."""
from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
# How often, at most, the files behind a server's or client's TLS are looked at for a renewal.
RELOAD_CHECK_S = 1.0


class FileWatch:
    """Notices a change of any of some files (inode, size or modification time: a rewrite in
    place, or a Kubernetes Secret volume swapping its `..data` link), looking at most once every
    `every_s` seconds."""

    def __init__(self, paths: Iterable[str], every_s: float = RELOAD_CHECK_S):
        self.paths = [p for p in paths if p]
        self.every_s = every_s
        self._seen = self.look()
        self._next = time.monotonic() + every_s
        self._lock = threading.Lock()

    def look(self) -> tuple:
        state = []
        for path in self.paths:
            try:
                st = os.stat(path)
                state.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                state.append(None)
        return tuple(state)

    def poll(self) -> tuple | None:
        """The files' state when it differs from the one last `accept`ed (None: the same, or not
        looked at: looked at less than `every_s` ago)."""
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                return None
            self._next = now + self.every_s
        state = self.look()
        return state if state != self._seen else None

    def accept(self, state: tuple) -> None:
        self._seen = state


class Reloaded(Generic[T]):
    """What `build` makes of some files, made again when they change (`get`); a build that
    fails keeps the last one in use, logged once per state of the files, and is tried again
    while they stay as they are. Thread-safe (gRPC asks from its own threads)."""

    def __init__(self, what: str, paths: Iterable[str], build: Callable[[], T], every_s: float = RELOAD_CHECK_S):
        self.what = what
        self._watch = FileWatch(paths, every_s)
        self._build = build
        self.current = build()  # at start, a failure is the caller's (the service does not start)
        self.generation = 0
        self._failed: tuple | None = None
        self._lock = threading.Lock()

    def get(self) -> T:
        state = self._watch.poll()
        if state is not None:
            with self._lock:
                try:
                    self.current = self._build()
                except (OSError, ssl.SSLError, ValueError) as exc:
                    if state != self._failed:
                        log.warning("%s: the files changed but do not load (%s); the previous ones stay in use",
                                    self.what, exc)
                        self._failed = state
                else:
                    self._watch.accept(state)
                    self.generation += 1
                    log.info("%s: renewed files loaded", self.what)
        return self.current
