"""An edge runtime's cnei_inference_requests_total carries a model name as a label only for a
model it has resolved: malformed requests for names clients make up are counted under `_unknown`,
those for its model under the model. The runtime core behind a real OIP gRPC server, against the
module's registry process."""
from __future__ import annotations

from dataclasses import replace

import grpc
import numpy as np
from prometheus_client import REGISTRY

from services.common import lifecycle
from services.common import settings as cfg
from services.common.oip_servicer import OipServicer
from services.common.registry_client import RegistryClient
from services.edge_runtime.cache import DiskCache
from services.edge_runtime.core import EdgeRuntime
from services.edge_runtime.settings import PREFIX, RuntimeSettings
from services.pb.inference import grpc_service_pb2 as pb
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc


async def _send(stub, model: str, raw_contents: int = 1) -> str:
    """The status name of one ModelInfer of a digits row, sent as `raw_contents` raw contents."""
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    message.raw_input_contents.extend([np.ones((1, 64), np.float32).tobytes()] * raw_contents)
    try:
        await stub.ModelInfer(message, timeout=10)
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


def _counts(model: str) -> dict[str, float]:
    return {s.labels["outcome"]: s.value for m in REGISTRY.collect() if m.name == "cnei_inference_requests"
            for s in m.samples if s.name.endswith("_total") and s.labels["model"] == model}


def _labelled(prefix: str) -> list[str]:
    return sorted({s.labels["model"] for m in REGISTRY.collect()
                   if m.name in ("cnei_inference_requests", "cnei_inference_request_duration_seconds")
                   for s in m.samples if s.labels.get("model", "").startswith(prefix)})


async def test_malformed_requests_count_under_unknown_for_made_up_names_and_under_the_model_for_its_own(
        registry, push_digits, tmp_path):
    model = (await push_digits("labels")).name
    client = RegistryClient(registry, timeout=10)
    settings = replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(tmp_path), intra_op_threads=1,
                       measure_on_load=False)
    runtime = EdgeRuntime(settings, client, DiskCache(tmp_path))
    server = lifecycle.GrpcServer("127.0.0.1", 0)
    server.add(pb_grpc.add_GRPCInferenceServiceServicer_to_server, OipServicer(runtime),
               "inference.GRPCInferenceService")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert await _send(stub, model) == "OK"
            unknown, own = _counts("_unknown"), _counts(model)
            assert [await _send(stub, f"made-up-runtime-{i}", raw_contents=2) for i in range(3)] == \
                ["INVALID_ARGUMENT"] * 3
            assert await _send(stub, model, raw_contents=2) == "INVALID_ARGUMENT"
            assert _labelled("made-up-runtime-") == []
            assert _counts("_unknown").get("invalid_argument", 0) - unknown.get("invalid_argument", 0) == 3
            assert _counts(model).get("invalid_argument", 0) - own.get("invalid_argument", 0) == 1
    finally:
        await server.stop(0)
        runtime.close()
        await client.close()
