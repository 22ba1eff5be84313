"""The compiled front door passes on only the services its public port serves (every method of
the OIP service, health, server reflection v1alpha and v1) and answers any other call
UNIMPLEMENTED at once, as gRPC answers a method it does not have, without sending it on. The door
runs in front of a real gRPC server standing in for the coordinator's internal port, which notes
every call that reaches it and answers it UNIMPLEMENTED."""
from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from services.cli import infra
from services.common import lifecycle
from services.coordinator.door_process import BUILT, DoorProcess
from services.pb.inference import grpc_service_pb2 as oip_pb

pytestmark = pytest.mark.skipif(not BUILT.is_file(), reason=f"front door not built ({BUILT}): make frontdoor")
OIP = oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
MARK = "cnei-test-call"  # on every call a test sends: what the door sends of its own has none


class Recorder(grpc.GenericRpcHandler):
    """Notes every call the server gets (its path and the test's mark on it, if any) and serves
    none (UNIMPLEMENTED)."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def service(self, handler_call_details):
        mark = dict(handler_call_details.invocation_metadata).get(MARK, "")
        self.calls.append((handler_call_details.method, mark))
        return None


@pytest.fixture(scope="module")
def backend():
    recorder = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((recorder,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield recorder, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture(scope="module")
def door(backend):
    _, backend_address = backend
    port = infra.free_port()
    process = DoorProcess(BUILT, f"127.0.0.1:{port}", backend_address, 100)
    process.start()
    try:
        infra.wait_for_port("127.0.0.1", port, proc=process.proc)
        yield f"127.0.0.1:{port}"
    finally:
        lifecycle.stop_process(process.proc)
        process.join_readers()


@pytest.fixture
def recorded(backend):
    """The calls that reach the backend during the test: (path, mark)."""
    recorder, _ = backend
    recorder.calls.clear()
    return recorder.calls


def call(address: str, path: str, streamed: bool, mark: str = "") -> grpc.RpcError | None:
    """How a call of `path` with an empty request and `mark` at `address` fails (None: it did
    not), unary or as a stream."""
    metadata = [(MARK, mark)] if mark else None
    with grpc.insecure_channel(address) as channel:
        try:
            if streamed:
                list(channel.stream_stream(path)(iter([b""]), timeout=10, metadata=metadata))
            else:
                channel.unary_unary(path)(b"", timeout=10, metadata=metadata)
        except grpc.RpcError as failed:
            return failed
    return None


def _paths(service) -> list[tuple[str, bool]]:
    return [(f"/{service.full_name}/{m.name}", m.client_streaming or m.server_streaming) for m in service.methods]


PASSED = [
    *_paths(OIP),
    *_paths(health_pb2.DESCRIPTOR.services_by_name["Health"]),
    *_paths(reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", True),
]
# The door sends each request of a ModelStreamInfer stream it does not serve itself on as a ModelInfer.
SENT_AS = {"/inference.GRPCInferenceService/ModelStreamInfer": "/inference.GRPCInferenceService/ModelInfer"}
REFUSED = [
    "/cnei.nothing.v1.Nothing/Call",  # a service nobody has
    "/inference.GRPCInferenceService/ModelTrain",  # a method the OIP service does not have
    "/grpc.health.v1.Health/Forget",
    "/grpc.reflection.v1alpha.ServerReflection/Describe",
    "/cnei.frontdoor.v1.FrontDoorControl/Report",  # the door's own link to the coordinator
    "/cnei.node.v1.NodeControl/Load",  # a CNEI service the coordinator's port is not for
    "/inference.GRPCInferenceService/ServerLive/",  # a passed method's path, made longer
    "/inference.GRPCInferenceServiceX/ServerLive",
]


@pytest.mark.parametrize(("path", "streamed"), PASSED, ids=[p for p, _ in PASSED])
def test_each_method_of_a_service_the_port_serves_reaches_the_coordinator(door, recorded, path, streamed):
    call(door, path, streamed, mark=path)
    assert (SENT_AS.get(path, path), path) in recorded


@pytest.mark.parametrize("streamed", [False, True], ids=["unary", "streamed"])
@pytest.mark.parametrize("path", REFUSED)
def test_any_other_call_is_unimplemented_at_the_door_as_grpc_answers_it_and_reaches_nobody(
        door, backend, recorded, path, streamed):
    refused = call(door, path, streamed, mark=path)
    unknown = call(backend[1], "/cnei.nothing.v1.Nothing/Call", streamed)  # gRPC's own answer
    assert [(p, m) for p, m in recorded if m] == []
    assert (refused.code(), refused.details()) == (unknown.code(), unknown.details())
    assert refused.code() == grpc.StatusCode.UNIMPLEMENTED
