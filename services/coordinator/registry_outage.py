"""Whether the coordinator's registry answers: an outage begun and ended, logged once (reminded at
most every REMIND_S while it lasts), its length on a gauge and the status page, and the error a
model never read gets meanwhile."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from prometheus_client import Gauge

from services.common.errors import CneiError, ErrorCode, Unavailable
from services.common.throttle import Throttle

log = logging.getLogger(__name__)
REMIND_S = 60.0
OUTAGE_CODES = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED})
UNREACHABLE_SECONDS = Gauge(
    "cnei_coordinator_registry_unreachable_seconds",
    "How long the registry has not answered the coordinator's reads (0: it answers); meanwhile the "
    "models read before are served from their last known variants and deployments")


class RegistryUnreachable(Unavailable):
    """The registry did not answer a read of something this coordinator never knew."""

    def __init__(self, target: str, what: str, said: str):
        self.target, self.what = target, what
        super().__init__(f"registry {target} unreachable and {what} was never read from it: {said}")


def is_outage(exc: BaseException) -> bool:
    """Whether a failed registry read says the registry is away or slow, rather than answering."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return True
    return isinstance(exc, CneiError) and exc.code in OUTAGE_CODES


def what_failed(exc: BaseException, timeout_s: float) -> str:
    """A failed read as the log and the client are told it (a timeout of ours has no message)."""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"no answer within {timeout_s:g} s"
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


class Outage:
    """The registry's state as the coordinator's reads find it."""

    def __init__(self, target: str, clock: Callable[[], float] = time.monotonic):
        self.target = target
        self.clock = clock
        self.since: float | None = None  # when the first read of this outage failed
        self.error = ""
        self._lines = Throttle(REMIND_S)  # its first line at once, then a reminder at most every REMIND_S
        UNREACHABLE_SECONDS.set_function(self.seconds)

    @property
    def down(self) -> bool:
        return self.since is not None

    def seconds(self) -> float:
        return 0.0 if self.since is None else self.clock() - self.since

    def failed(self, said: str) -> None:
        """A read got no answer (`said`: why): the outage begins, or goes on."""
        now = self.clock()
        self.error = f"registry {self.target}: {said}"
        if self.since is None:
            self.since = now
        if summary := self._lines.note(now):
            if summary.first:
                log.warning("registry %s unreachable (%s): models read before are served from their last known "
                            "variants and deployments; models never read fail UNAVAILABLE", self.target, said)
            else:
                log.warning("registry %s still unreachable after %.0f s (%s)", self.target, now - self.since, said)

    def answered(self) -> None:
        """A read was answered: an outage, if there was one, is over."""
        if self.since is not None:
            now = self.clock()
            self._lines.end(now)
            log.info("registry %s reachable again after %.1f s", self.target, now - self.since)
            self.since, self.error = None, ""

    def summary(self) -> dict:
        """What the status page shows of it."""
        return {"target": self.target, "reachable": self.since is None,
                "unreachable_s": round(self.seconds(), 1), "error": self.error}
