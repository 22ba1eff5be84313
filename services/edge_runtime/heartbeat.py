"""Heartbeats: keep this node's TTL'd record in Redis current; announce up/down on NATS."""
from __future__ import annotations

import asyncio
import logging
import os
import time

from redis.asyncio import Redis

from services.common import events, lifecycle
from services.common.bus import EventBus
from services.common.errors import describe
from services.common.nodes import NodeDirectory, NodeInfo
from services.edge_runtime.core import EdgeRuntime
from services.edge_runtime.resources import CpuSampler, memory_load
from services.edge_runtime.settings import RuntimeSettings

log = logging.getLogger(__name__)
BEAT_PATIENCE_S = 10.0


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def check_settings(prefix: str, settings: RuntimeSettings) -> None:
    """Stop (SystemExit naming the variables) before starting when heartbeats could never keep
    the node record alive: the record must outlive the time between two beats."""
    interval, ttl = settings.heartbeat_interval_s, settings.heartbeat_ttl_s
    if not 0 < interval < ttl:
        raise SystemExit(f"{prefix}HEARTBEAT_INTERVAL_S ({interval}) must be above 0 and below "
                         f"{prefix}HEARTBEAT_TTL_S ({ttl}): the node record would expire between heartbeats "
                         f"(on a slow link to Redis, leave room for a round trip too)")


def patience(settings: RuntimeSettings) -> float:
    """How long a whole beat may take before it is given up: at least the record's life and
    BEAT_PATIENCE_S, so a slow link to Redis (an edge site whose round trips take over a second,
    and a new connection's handshake several of them) still renews the record, where a shorter cap
    would cancel every beat, and its connection with it, for good. Each single wait on the socket
    is bounded by the TTL (`redis_client`): a connection gone silent is dropped and made anew
    within one record life."""
    return max(settings.heartbeat_ttl_s, BEAT_PATIENCE_S)


def redis_client(settings: RuntimeSettings) -> Redis:
    """The runtime's Redis client, its socket timeouts (connect, each reply) the record's life:
    a reply slower than that comes after the record expired anyway, and waiting longer on a
    connection gone silent would keep the node out of the view (seen: ~9 s of a 0.8 s-TTL cloud
    node's record missing with 10 s socket timeouts)."""
    ttl = settings.heartbeat_ttl_s
    return Redis.from_url(settings.redis_url, socket_timeout=ttl, socket_connect_timeout=ttl)


def node_info(settings: RuntimeSettings, runtime: EdgeRuntime, started_at: float,
              cpu_load: float = 0.0, fast_address: str = "") -> NodeInfo:
    return NodeInfo(
        node_id=settings.node_id, tier=settings.tier, region=settings.region,
        node_class=settings.measured_class, fast_address=fast_address,
        address=settings.address, cpus=os.cpu_count() or 1, memory_bytes=_memory_bytes(),
        models=runtime.l1.keys(), inflight=runtime.inflight,
        cache_bytes=runtime.l1.bytes_used, started_at=started_at,
        cpu_load=cpu_load, mem_load=memory_load(),
    )


class Heartbeat:
    """Background task writing the node record every interval; survives Redis outages."""

    def __init__(self, settings: RuntimeSettings, runtime: EdgeRuntime,
                 directory: NodeDirectory, bus: EventBus):
        self.settings, self.runtime, self.directory, self.bus = settings, runtime, directory, bus
        self.started_at = time.time()
        self._task: asyncio.Task | None = None
        self._registered = False
        self._cpu = CpuSampler()
        self._lost_contact = False
        self.fast_address = ""
        self._metrics_seq = 0

    async def beat(self) -> None:
        info = node_info(self.settings, self.runtime, self.started_at, self._cpu.sample(),
                         self.fast_address)
        await asyncio.wait_for(self.directory.heartbeat(info, self.settings.heartbeat_ttl_s), patience(self.settings))
        if not self._registered:
            self._registered = True
            await self._announce(events.NODE_UP)
            if self._lost_contact:
                self._lost_contact = False
                log.info("re-registered after losing Redis; resyncing models")
                self.runtime.background.spawn(self.runtime.resync())

    async def report_metrics(self) -> None:
        """A metrics snapshot as an event; buffered on disk by the bus while NATS is away."""
        self._metrics_seq += 1
        stats = {f"{s.name}:{s.version}": {"inferences": s.inference_count, "executions": s.execution_count,
                                            "failures": s.fail.count}
                 for s in self.runtime.stats.select()}
        await self.bus.publish(events.NODE_METRICS, {
            "node_id": self.settings.node_id, "seq": self._metrics_seq, "time": time.time(),
            "inflight": self.runtime.inflight, "cache_bytes": self.runtime.l1.bytes_used,
            "models": self.runtime.l1.keys(), "stats": stats,
        })

    async def _announce(self, subject: str) -> None:
        payload = {"node_id": self.settings.node_id, "tier": self.settings.tier,
                   "region": self.settings.region, "address": self.settings.address}
        try:
            await asyncio.wait_for(self.bus.publish(subject, payload), 2.0)
        except Exception as exc:  # noqa: BLE001 - liveness is in Redis; the event is advisory
            log.warning("could not publish %s: %s", subject, exc)

    async def _loop(self) -> None:
        next_metrics = time.monotonic()
        while True:
            # beats start every interval (or as soon as the last one ends, on a link slower than
            # that): the time between renewals does not grow by the round trip
            due = time.monotonic() + self.settings.heartbeat_interval_s
            try:
                await self.beat()
            except Exception as exc:  # noqa: BLE001 - keep beating through outages
                if self._registered:
                    log.warning("heartbeat failed: %s", exc)
                    self._lost_contact = True
                self._registered = False
            if self.settings.metrics_interval_s > 0 and time.monotonic() >= next_metrics:
                next_metrics = time.monotonic() + self.settings.metrics_interval_s
                try:
                    await self.report_metrics()
                except Exception as exc:  # noqa: BLE001
                    log.warning("metrics snapshot failed: %s", exc)
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="heartbeat")

    async def stop(self) -> None:
        """Stop beating and remove the record so routers drop this node at once (unless another
        process heartbeats under this node id now: its record, and it, stay)."""
        await lifecycle.cancel_and_wait(self._task)
        try:
            removed = await asyncio.wait_for(self.directory.remove(self.settings.node_id, self.settings.address),
                                             self.settings.heartbeat_ttl_s)  # after that it has expired anyway
        except Exception as exc:  # noqa: BLE001 - the TTL removes it anyway
            log.warning("could not deregister (its record expires within %ss): %s", self.settings.heartbeat_ttl_s,
                        describe(exc))
            removed = True
        if not removed:
            log.warning("node id %s is heartbeated by another process (not at %s): its record is left",
                        self.settings.node_id, self.settings.address)
            return
        await self._announce(events.NODE_DOWN)
