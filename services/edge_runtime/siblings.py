"""Sibling measurement: the other precisions of a version loaded here, timed in the background."""
from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from services.common import lifecycle
from services.common.model_spec import PRECISIONS, ModelVariant
from services.common.registry_client import RegistryClient
from services.edge_runtime.emulation import slowed
from services.edge_runtime.runner import OrtModel, measure_variant, rss_bytes
from services.edge_runtime.settings import RuntimeSettings

log = logging.getLogger(__name__)
LOWEST_PRIORITY = 19  # the measuring thread's nice value: serving threads always go first
IDLE_POLL_S = 0.1
IDLE_WAIT_S = 30.0  # a node busy for this long is measured anyway (slower than it would be idle)
TRIES = 3  # a measurement requests arrived during is made again, this many times at most
QUEUED_VERSIONS = 64

Activity = tuple[int, int]  # (requests in flight, requests arrived so far)


def unmeasured_siblings(variants: list[ModelVariant], loaded: ModelVariant, node_class: str) -> list[ModelVariant]:
    """The other precisions of `loaded`'s version that hold no latency measured on `node_class`,
    in the default resolution order (pure)."""
    measured = f"latency_ms.{node_class}"
    siblings = [v for v in variants if v.name == loaded.name and v.version == loaded.version
                and v.precision != loaded.precision and measured not in v.metadata]
    return sorted(siblings, key=lambda v: PRECISIONS.index(v.precision) if v.precision in PRECISIONS else 99)


def lower_priority() -> None:
    """Give the calling thread, and the threads it starts (ONNX Runtime's intra-op pool, made
    with the session), the lowest CPU priority (Linux: nice is per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOWEST_PRIORITY)
    except (AttributeError, OSError) as exc:
        log.info("sibling measurements run at normal priority: %s", exc)


def measure_artifact(path: Path, variant: ModelVariant, use_cuda: bool, threads: int,
                     slowdown: float = 1.0) -> tuple[float, int]:
    """Open the artifact, measure it as a load measures its variant (`measure_variant`), and drop
    the session (blocking): (latency in ms, memory in bytes: what the process grew by, at least
    the artifact's size)."""
    rss_before = rss_bytes()
    model = OrtModel(path, use_cuda, threads)
    model.run = slowed(model.run, slowdown)
    return measure_variant(model, variant, rss_before)


class SiblingMeasurer:
    """Measures the sibling precisions of each version loaded here that the registry has no
    latency for on this node class, and reports them as a load reports its variant's: one
    version and one variant at a time, on a thread of its own at the lowest CPU priority, when no
    request is in flight or arriving. The sessions it opens never enter the L1 cache."""

    def __init__(self, registry: RegistryClient, settings: RuntimeSettings,
                 artifact: Callable[[ModelVariant], AbstractAsyncContextManager[Path]],
                 report: Callable[[ModelVariant, float, int], Awaitable[None]],
                 activity: Callable[[], Activity], is_loaded: Callable[[str], bool]):
        self.registry = registry
        self.node_class, self.use_cuda = settings.measured_class, settings.use_cuda
        self.slowdown = settings.emulated_slowdown
        self._artifact, self._report, self._activity, self._is_loaded = artifact, report, activity, is_loaded
        self._queue: asyncio.Queue[tuple[ModelVariant, int]] = asyncio.Queue(QUEUED_VERSIONS)
        self._queued: set[tuple[str, str]] = set()
        self._task: asyncio.Task | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="measure", initializer=lower_priority)

    def schedule(self, loaded: ModelVariant, threads: int) -> None:
        """Measure the siblings of `loaded` (just loaded, on `threads` intra-op threads, which
        they are given too: their latencies compare with its own) once the work before is done."""
        version = (loaded.name, loaded.version)
        if version in self._queued:
            return
        try:
            self._queue.put_nowait((loaded, threads))
        except asyncio.QueueFull:
            log.warning("%d versions wait for sibling measurements: not measuring those of %s",
                        QUEUED_VERSIONS, loaded.key)
            return
        self._queued.add(version)
        if self._task is None or self._task.done():
            # a context of its own: the load that started it is not the parent of its RPCs or logs
            self._task = asyncio.create_task(self._work(), name="measure-siblings", context=contextvars.Context())

    async def idle(self) -> None:
        """Wait until everything scheduled so far was measured (or given up)."""
        await self._queue.join()

    async def stop(self) -> None:
        await lifecycle.cancel_and_wait(self._task)

    def close(self) -> None:
        """Let a measurement under way end (the runtime's executor is waited for alike)."""
        self._thread.shutdown(wait=True, cancel_futures=True)

    async def _work(self) -> None:
        while True:
            loaded, threads = await self._queue.get()
            try:
                await self._measure_siblings(loaded, threads)
            finally:
                self._queued.discard((loaded.name, loaded.version))
                self._queue.task_done()

    async def _measure_siblings(self, loaded: ModelVariant, threads: int) -> None:
        try:
            variants = await self.registry.list(loaded.name)
        except Exception as exc:  # noqa: BLE001 - measurements are advisory
            log.warning("could not list the precisions of %s to measure them: %s", loaded.key, exc)
            return
        for sibling in unmeasured_siblings(variants, loaded, self.node_class):
            if self._is_loaded(sibling.key):
                continue  # measured when it loaded
            try:
                await self._measure(sibling, threads)
            except Exception as exc:  # noqa: BLE001 - one that fails leaves the others measured
                log.warning("could not measure %s, a sibling of %s: %s", sibling.key, loaded.key, exc)

    async def _measure(self, sibling: ModelVariant, threads: int) -> None:
        loop, memory = asyncio.get_running_loop(), 0
        async with self._artifact(sibling) as path:  # pulled to the disk cache, kept there meanwhile
            for attempt in range(1, TRIES + 1):
                quiet = await self._quiet()
                latency, used = await loop.run_in_executor(self._thread, measure_artifact, path, sibling,
                                                           self.use_cuda, threads, self.slowdown)
                memory = max(memory, used)
                if not quiet[0] and quiet == self._activity():
                    break
                log.info("requests came while %s was measured (try %d of %d)", sibling.key, attempt, TRIES)
        await self._report(sibling, latency, memory)

    async def _quiet(self) -> Activity:
        """Wait for no request in flight and none arriving for a poll (at most IDLE_WAIT_S): the
        activity then."""
        deadline, last = time.monotonic() + IDLE_WAIT_S, self._activity()
        while time.monotonic() < deadline:
            await asyncio.sleep(IDLE_POLL_S)
            now = self._activity()
            if now == last and not now[0]:
                return now
            last = now
        return last
