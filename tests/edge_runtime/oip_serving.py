"""An edge runtime core behind a real OIP gRPC server, against a registry process, for tests of what
its requests count: the model served once, and one digits row sent as a test asks."""
from __future__ import annotations

import contextlib
from dataclasses import replace

import grpc
import numpy as np

from services.common import lifecycle
from services.common import settings as cfg
from services.common.oip_servicer import OipServicer
from services.common.registry_client import RegistryClient
from services.edge_runtime.cache import DiskCache
from services.edge_runtime.core import EdgeRuntime
from services.edge_runtime.settings import PREFIX, RuntimeSettings
from services.pb.inference import grpc_service_pb2 as pb
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc


@contextlib.asynccontextmanager
async def serving(registry: str, push_digits, folder, label: str, **settings):
    """(stub, runtime, model) with a digits model pushed under `label` and its version 1 served
    once, for a request naming none."""
    variant = await push_digits(label)
    client = RegistryClient(registry, timeout=10)
    runtime = EdgeRuntime(replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(folder), intra_op_threads=1,
                                  measure_on_load=False, **settings), client, DiskCache(folder))
    server = lifecycle.GrpcServer("127.0.0.1", 0)
    server.add(pb_grpc.add_GRPCInferenceServiceServicer_to_server, OipServicer(runtime),
               "inference.GRPCInferenceService")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert await send_row(stub, variant.name) == "OK"
            yield stub, runtime, variant.name
    finally:
        await server.stop(0)
        runtime.close()
        await client.close()


async def send_row(stub, model: str, version: str = "", name: str = "input", raw_bytes: int | None = None,
                   raw_contents: int = 1) -> str:
    """The status name of one ModelInfer of a digits row (`name`: its input's name; `raw_bytes`:
    that many bytes of it; `raw_contents`: sent as that many raw contents)."""
    message = pb.ModelInferRequest(model_name=model, model_version=version)
    message.inputs.add(name=name, datatype="FP32", shape=[1, 64])
    message.raw_input_contents.extend([np.ones((1, 64), np.float32).tobytes()[:raw_bytes]] * raw_contents)
    try:
        await stub.ModelInfer(message, timeout=10)
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name
