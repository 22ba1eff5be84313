"""The compiled front door's rows per node reach the coordinator's placement while they stand: a
node holding the door's requests leaves its rows unchanged, and the door reports them every
interval all the same, so the coordinator (which drops a report once it is over 1 s old) keeps
weighing them. A real door in front of a real coordinator over a stand-in node."""
from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from services.cli import infra
from services.common import oip
from services.common.deployment import DeploymentSpec
from services.coordinator.door_process import BUILT, DoorProcess
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.coordinator import mesh

pytestmark = pytest.mark.skipif(not BUILT.is_file(), reason=f"front door not built ({BUILT}): make frontdoor")
NODE_DELAY_S = 3.0


class StuckNode(mesh.NodeCore):
    """A stand-in node answering at once until `stick()`; then the first call it gets, and every
    call while that one waits, is held until NODE_DELAY_S after that first call came."""

    def __init__(self):
        super().__init__()
        self.stuck, self.release_at = False, None

    def stick(self) -> None:
        self.stuck = True

    async def infer(self, request: oip.InferRequest, deadline_s: float | None = None) -> oip.InferResponse:
        loop = asyncio.get_running_loop()
        if self.stuck and self.release_at is None:
            self.release_at = loop.time() + NODE_DELAY_S
        if self.release_at is not None:
            await asyncio.sleep(max(0.0, self.release_at - loop.time()))
        return await super().infer(request, deadline_s)


async def _infer(stub: pb_grpc.GRPCInferenceServiceStub) -> bool:
    """One request through the door: whether the door answered it itself."""
    message = oip.request_to_proto(oip.InferRequest("m", {"x": np.ones((1, 2), np.float32)}))
    reply = await stub.ModelInfer(message, timeout=30)
    return "cnei_front_door" in reply.parameters


async def _door_routes(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """Until the door answers a request itself (its route learned)."""
    deadline = time.monotonic() + 30
    while not await _infer(stub):
        assert time.monotonic() < deadline, "the door never answered itself"


async def test_the_door_reports_the_rows_a_slow_node_holds_every_interval_so_placement_keeps_weighing_them():
    slow = StuckNode()  # answers at once until the door knows its route
    cores = {"edge-slow": slow}
    specs = {"m": DeploymentSpec(model="m", attempt_timeout_ms=10_000)}  # the node's slowness is no failure
    async with mesh.mesh([mesh.variant()], specs, cores, fast_lane=True, door=True) as m:
        port = infra.free_port()
        public = f"127.0.0.1:{port}"
        door = DoorProcess(BUILT, public, m.address, 100)
        door.start()
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: infra.wait_for_port("127.0.0.1", port, proc=door.proc, timeout=15))
            async with grpc.aio.insecure_channel(public) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                await _door_routes(stub)
                slow.stick()
                held = [asyncio.create_task(_infer(stub)) for _ in range(3)]
                await asyncio.sleep(0.3)  # queued and sent: the door's rows at the node change no more
                seen = []
                while not held[0].done():
                    seen.append(m.core.rows_outstanding().get("edge-slow", 0))
                    await asyncio.sleep(0.05)
                answered = await asyncio.gather(*held)
        finally:
            await door.stop()
    assert all(answered), answered
    assert len(seen) > 40 and min(seen) >= 1, f"the door's rows at the node, every 50 ms: {seen}"
