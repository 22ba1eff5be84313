"""ModelStreamInfer over a real gRPC server: a request whose handling fails with an unexpected
error (not one of CNEI's own) answers in its place with `error_message`, and the stream goes on
(Triton's semantics); it never ends the stream for the requests after it."""
from __future__ import annotations


import grpc
import numpy as np
import pytest

from services.common import oip
from services.common.oip_servicer import OipServicer
from services.pb.inference import grpc_service_pb2 as pb
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc


class DoublingCore:
    """A core that doubles its input, and fails as a bug would on model 'broken'."""

    server_name, server_version = "test", "0"

    def request_failed(self, name: str, version: str, ns: int) -> None:
        """A malformed request its servicer refused: this core keeps no statistics."""

    def knows_model(self, name: str) -> bool:
        """It serves every model."""
        return True

    async def infer(self, request: oip.InferRequest, deadline_s: float | None = None) -> oip.InferResponse:
        if request.model_name == "broken":
            raise RuntimeError("something nobody planned for")
        return oip.InferResponse(request.model_name, {"y": request.inputs["x"] * 2}, id=request.id)


def _request(model: str, value: float, id_: str) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model, id=id_)
    message.inputs.add(name="x", datatype="FP32", shape=[1])
    message.raw_input_contents.append(np.array([value], np.float32).tobytes())
    return message


@pytest.mark.asyncio
async def test_an_unexpected_error_answers_in_place_and_the_stream_goes_on():
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(OipServicer(DoublingCore()), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                iter([_request("m", 1.0, "a"), _request("broken", 2.0, "b"), _request("m", 3.0, "c")]), timeout=10)
            replies = [reply async for reply in stream]
    finally:
        await server.stop(None)
    assert [r.infer_response.id for r in replies] == ["a", "b", "c"]
    assert [r.error_message for r in replies] == [
        "", "INTERNAL: internal error: RuntimeError: something nobody planned for", ""]
    assert replies[1].infer_response.model_name == "broken"
    assert np.frombuffer(replies[2].infer_response.raw_output_contents[0], np.float32).tolist() == [6.0]
