"""The coordinator's view of live nodes: refreshed from Redis, one channel per node, and the
measured network RTT to each node (EWMA of health probes and of request overheads)."""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import events, grpc_util, lifecycle
from services.common.fastlane import FastClient
from services.common.nodes import NodeDirectory, NodeInfo
from services.common.throttle import Throttle
from services.common.tls import ClientTls
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
REFRESH_LOG_INTERVAL_S = 60.0  # a spell of failed node refreshes is summed up at most this often
EWMA_ALPHA = 0.3


def diff_nodes(before: list[NodeInfo], after: list[NodeInfo]) -> tuple[list[NodeInfo], list[NodeInfo]]:
    """(appeared, vanished) between two views. A node id is the same node only at the same
    addresses: one back at others (its pod restarted, another process claiming the id) left and
    came back, so nothing keeps calling where it used to be."""
    old, new = {n.node_id: n for n in before}, {n.node_id: n for n in after}
    moved = {i for i in old.keys() & new.keys() if old[i].place != new[i].place}
    return ([n for i, n in new.items() if i not in old or i in moved],
            [n for i, n in old.items() if i not in new or i in moved])


def ewma(previous: float | None, sample: float, alpha: float = EWMA_ALPHA) -> float:
    return sample if previous is None else alpha * sample + (1 - alpha) * previous


class NodesView:
    """Live nodes from Redis, re-read every `refresh_s`; stale view kept through Redis outages.

    A Redis back from an outage (or restarted: node records written with a short TTL are expired
    when it reloads, their index is not) shows live nodes as gone until their next heartbeat; so
    after a failed read, or when every node seems gone at once and none new came, a missing node
    stays in the view for `grace_s` before it counts as gone."""

    def __init__(self, directory: NodeDirectory, refresh_s: float, probe_s: float = 1.0,
                 on_change: Callable[[str, NodeInfo, str], None] | None = None,
                 channels: grpc_util.Channels | None = None, tls: ClientTls | None = None,
                 grace_s: float = 2.0):
        """`channels`: the nodes' gRPC channels (their headers, also sent in the fast lane's
        hello, and TLS), shared with the coordinator's other clients of them; `tls`: the nodes
        serve TLS on the fast lane too (None: plaintext)."""
        self.grace_s = grace_s
        self._grace_until = 0.0  # after a failed read, missing nodes are given time until then
        self._read_failed = False
        self._missing_since: dict[str, float] = {}
        self.directory = directory
        self.channels = channels or grpc_util.Channels()
        self.headers = self.channels.headers
        self._ssl = tls.renewed_ssl_context() if tls else None
        self._server_name = tls.server_name if tls else ""
        self.refresh_s = refresh_s
        self.probe_s = probe_s
        self.nodes: list[NodeInfo] = []
        self.rtt_ms: dict[str, float] = {}
        self.compute_ms: dict[str, float] = {}
        self._stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.GRPCInferenceServiceStub]] = {}
        self._fast: dict[str, FastClient] = {}
        self._tasks: list[asyncio.Task] = []
        self.on_change = on_change  # (NODE_UP | NODE_DOWN, node, reason)
        self.unhealthy: dict[str, str] = {}  # node id -> why its health check failed
        self._refresh_failures = Throttle(REFRESH_LOG_INTERVAL_S)

    async def refresh(self) -> None:
        try:
            nodes = await asyncio.wait_for(self.directory.live_nodes(), 1.0)
        except BaseException:
            self._read_failed = True
            raise
        nodes = self._with_grace(nodes, time.monotonic())
        appeared, vanished = diff_nodes(self.nodes, nodes)
        self.nodes = nodes
        closing = [self._forget(node) for node in vanished]
        if self.on_change is not None:  # a node gone is no longer in `nodes` when it is told
            for node in vanished:  # first: a node back at new addresses leaves, then comes back
                self.on_change(events.NODE_DOWN, node, "heartbeat expired")
            for node in appeared:
                self.on_change(events.NODE_UP, node, "heartbeat")
        await asyncio.gather(*closing, return_exceptions=True)

    def _with_grace(self, nodes: list[NodeInfo], now: float) -> list[NodeInfo]:
        """`nodes` read, plus the nodes of the view missing from them that are given time: after a
        failed read, or when every node is missing at once and no new one came (Redis back with
        its records expired; a pod replaced by one under a new id is not that)."""
        if self._read_failed:
            self._read_failed = False
            self._grace_until = now + self.grace_s
        seen = {n.node_id for n in nodes}
        missing = [n for n in self.nodes if n.node_id not in seen]
        for node_id in [i for i in self._missing_since if i in seen]:
            del self._missing_since[node_id]
        if not missing:
            return nodes
        known = {n.node_id for n in self.nodes}
        emptied = len(missing) == len(self.nodes) and seen <= known  # all gone, none new: a reset Redis
        if emptied:  # the grace runs its course: nodes heartbeat again one by one
            self._grace_until = max(self._grace_until, now + self.grace_s)
        lenient = now < self._grace_until
        kept = []
        for node in missing:
            since = self._missing_since.setdefault(node.node_id, now)
            if lenient and now - since < self.grace_s:
                kept.append(node)
            else:
                self._missing_since.pop(node.node_id, None)
        return nodes + kept

    async def _forget(self, node: NodeInfo) -> None:
        """What is kept for a node that left the view: its measurements, and its channel and fast
        lane connection unless a live node has the same address (a pod back under a new id)."""
        self.rtt_ms.pop(node.node_id, None)
        self.compute_ms.pop(node.node_id, None)
        self.unhealthy.pop(node.node_id, None)
        if not any(n.address == node.address for n in self.nodes):
            self._stubs.pop(node.address, None)
            self.channels.drop(node.address)
        if node.fast_address and not any(n.fast_address == node.fast_address for n in self.nodes):
            client = self._fast.pop(node.fast_address, None)
            if client is not None:
                await client.close()  # its calls still open fail UNAVAILABLE: they fail over

    async def _refresh_logged(self) -> None:
        """One refresh; a failure keeps the last view. A spell of failures (Redis away) is logged
        at its first, summed up at most every REFRESH_LOG_INTERVAL_S, and at its end."""
        try:
            await self.refresh()
        except Exception as exc:  # noqa: BLE001 - keep the last view
            if summary := self._refresh_failures.note(time.monotonic()):
                if summary.first:
                    log.warning("node refresh failed: %s (the last view is kept; until a refresh works again, "
                                "failures are summed up at most every %.0f s)", exc, REFRESH_LOG_INTERVAL_S)
                else:
                    log.warning("node refresh still failing: %d failures in the last %.0f s, %d in all: %s",
                                summary.count, summary.span_s, summary.total, exc)
            return
        if summary := self._refresh_failures.end(time.monotonic()):
            log.warning("node refresh works again after %d failures", summary.total)

    async def _refresh_loop(self) -> None:
        while True:
            await self._refresh_logged()
            await asyncio.sleep(self.refresh_s)

    async def _probe(self, node: NodeInfo) -> None:
        stub = health_pb2_grpc.HealthStub(self.channels.get(node.address))
        start = time.perf_counter()
        why = ""
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                why = f"health check: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
        except grpc.aio.AioRpcError as exc:
            why = f"health check failed: {exc.details() or exc.code().name}"
        if why:
            if node.node_id not in self.unhealthy and self.on_change is not None:
                self.on_change(events.NODE_DOWN, node, why)
            self.unhealthy[node.node_id] = why
            return
        self.unhealthy.pop(node.node_id, None)
        self.observe_rtt(node.node_id, (time.perf_counter() - start) * 1e3)

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.gather(*(self._probe(n) for n in self.nodes), return_exceptions=True)
            await asyncio.sleep(self.probe_s)

    def observe_compute(self, node_id: str, ms_per_row: float) -> None:
        """EWMA of the node's compute time per batch row, from `cnei_compute_us` in replies."""
        self.compute_ms[node_id] = ewma(self.compute_ms.get(node_id), max(0.0, ms_per_row))

    def observe_rtt(self, node_id: str, rtt_ms: float) -> None:
        self.rtt_ms[node_id] = ewma(self.rtt_ms.get(node_id), max(0.0, rtt_ms))

    async def start(self) -> None:
        await self._refresh_logged()
        self._tasks = [asyncio.create_task(self._refresh_loop(), name="nodes-refresh"),
                       asyncio.create_task(self._probe_loop(), name="nodes-probe")]

    def fast_client(self, node: NodeInfo) -> FastClient:
        client = self._fast.get(node.fast_address)
        if client is None:
            client = self._fast[node.fast_address] = FastClient(node.fast_address, headers=self.headers,
                                                                            ssl_context=self._ssl,
                                                                            server_name=self._server_name)
        return client

    def stub(self, node: NodeInfo) -> pb_grpc.GRPCInferenceServiceStub:
        channel = self.channels.get(node.address)
        held = self._stubs.get(node.address)
        if held is None or held[0] is not channel:  # new, or its channel renewed
            held = self._stubs[node.address] = (channel, pb_grpc.GRPCInferenceServiceStub(channel))
        return held[1]

    async def close(self) -> None:
        await lifecycle.cancel_and_wait(*self._tasks)
        await asyncio.gather(*(client.close() for client in self._fast.values()), return_exceptions=True)
        await self.channels.close()
