"""Whether the registry answers: a runtime that found it unreachable serves from its own caches,
for every model at once, without waiting for it again until REGISTRY_RETRY_S have passed."""
from __future__ import annotations

import time

from services.common.errors import CneiError, ErrorCode

REGISTRY_RETRY_S = 2.0
UNREACHABLE = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.DEADLINE_EXCEEDED})


def unreachable(exc: CneiError) -> bool:
    """The error says the registry did not answer (rather than answering no)."""
    return exc.code in UNREACHABLE


class RegistryReach:
    """When the registry is asked again: at once, or after it was found unreachable (`failed`)."""

    def __init__(self) -> None:
        self.down_until = 0.0  # time.monotonic() from which the registry is asked again

    @property
    def offline(self) -> bool:
        """The registry was found unreachable less than REGISTRY_RETRY_S ago: never wait for it."""
        return time.monotonic() < self.down_until

    def failed(self, exc: CneiError) -> bool:
        """A call to the registry raised `exc`: when it says the registry is unreachable, offline
        for REGISTRY_RETRY_S (True); any other error leaves it as it was (False)."""
        if not unreachable(exc):
            return False
        self.down_until = time.monotonic() + REGISTRY_RETRY_S
        return True

    def back(self) -> None:
        """The registry answers again (a resync): ask it at once."""
        self.down_until = 0.0
