"""Preload at start, with models the registry does not hold yet loaded when it announces them."""
from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from services.common.errors import CneiError, ErrorCode
from services.common.model_spec import ModelVariant

log = logging.getLogger("services.edge_runtime")


class Loader(Protocol):
    async def resolve(self, name: str, version: str = "", precision: str = "") -> ModelVariant: ...
    async def load(self, variant: ModelVariant): ...


def parse_spec(spec: str) -> tuple[str, str, str]:
    """'name' or 'name:version:precision' → (name, version, precision), empty where not named."""
    name, _, rest = spec.partition(":")
    version, _, precision = rest.partition(":")
    return name, version, precision


class Preload:
    """The models a runtime loads without a request (Triton's --load-model): all at `start`; one
    the registry does not hold yet stays pending and loads (once) when the registry announces its
    name (`model_published`) or on a resync after a reconnect (`retry`). Each model is tried by
    one caller at a time, so an announcement during the start's attempt is not missed."""

    def __init__(self, runtime: Loader, specs: tuple[str, ...]):
        self._runtime = runtime
        self._pending = list(dict.fromkeys(specs))
        self._lock = asyncio.Lock()
        self._started = False

    @property
    def pending(self) -> tuple[str, ...]:
        return tuple(self._pending)

    async def start(self) -> None:
        self._started = True  # announcements (and connects) before this are covered by this attempt
        await self._attempt(lambda spec: True, first=True)

    async def model_published(self, name: str) -> None:
        await self._attempt(lambda spec: parse_spec(spec)[0] == name)

    async def retry(self) -> None:
        await self._attempt(lambda spec: True)

    async def _attempt(self, chosen, first: bool = False) -> None:
        if not self._started:
            return
        async with self._lock:
            for spec in [s for s in self._pending if chosen(s)]:
                if await self._load(spec, first):
                    self._pending.remove(spec)

    async def _load(self, spec: str, first: bool) -> bool:
        """Try `spec`: True once it is done with (loaded, or failed to load: preload is an
        optimisation, a request loads what it names); False while it waits for the registry."""
        try:
            variant = await self._runtime.resolve(*parse_spec(spec))
        except Exception as exc:  # noqa: BLE001 - preload is an optimisation
            if isinstance(exc, CneiError) and exc.code == ErrorCode.NOT_FOUND:
                log.log(logging.INFO if first else logging.DEBUG, "not preloading %s yet: not registered; loads "
                        "once pushed, when the registry announces it (or at a first request before) (%s)", spec, exc)
            else:
                log.warning("could not preload %s (tried again when the registry announces it): %s", spec, exc)
            return False
        try:
            await self._runtime.load(variant)
        except Exception as exc:  # noqa: BLE001 - preload is an optimisation
            log.warning("could not preload %s: %s", spec, exc)
            return True
        if not first:
            log.info("preloaded %s (registered after this runtime started)", spec)
        return True
