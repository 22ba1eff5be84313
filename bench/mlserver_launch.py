"""`mlserver start FOLDER`, plus the Triton ModelConfig RPC that perf_analyzer asks for once.

MLServer's gRPC API has no ModelConfig (a Triton extension); perf_analyzer calls it once at
start and stops without it. This launcher registers one extra handler on MLServer's own gRPC
server that answers it from the model-settings.json files (max_batch_size and the input and
output tensors); the inference path is MLServer's, untouched. Run with the MLServer venv's
python: `.bench/mlserver-venv/bin/python bench/mlserver_launch.py FOLDER`.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import grpc

TRITON_TYPES = {"BOOL": 1, "UINT8": 2, "UINT16": 3, "UINT32": 4, "UINT64": 5, "INT8": 6,
                "INT16": 7, "INT32": 8, "INT64": 9, "FP16": 10, "FP32": 11, "FP64": 12, "BYTES": 13}
MAX_BATCH_SIZE = 1024


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _tensor(tensor: dict, dims_field: int) -> bytes:
    """ModelInput (dims = 4) or ModelOutput (dims = 3), batch dimension left out."""
    dims = b"".join(_varint(d) for d in tensor["shape"][1:])
    return (_bytes_field(1, tensor["name"].encode()) +
            _int_field(2, TRITON_TYPES[tensor["datatype"]]) + _bytes_field(dims_field, dims))


def config_response(settings: dict) -> bytes:
    """Serialised ModelConfigResponse{config: ModelConfig{name, platform, max_batch_size, input, output}}."""
    config = (_bytes_field(1, settings["name"].encode()) + _bytes_field(2, b"onnxruntime_onnx") +
              _int_field(4, MAX_BATCH_SIZE) +
              b"".join(_bytes_field(5, _tensor(t, 4)) for t in settings.get("inputs", [])) +
              b"".join(_bytes_field(6, _tensor(t, 3)) for t in settings.get("outputs", [])))
    return _bytes_field(1, config)


def requested_name(request: bytes) -> str:
    """Field 1 (name) of a serialised ModelConfigRequest."""
    if not request or request[0] != 0x0A:
        return ""
    length, shift, i = 0, 0, 1
    while True:
        length |= (request[i] & 0x7F) << shift
        shift += 7
        i += 1
        if not request[i - 1] & 0x80:
            return request[i:i + length].decode()


def config_handler(folder: Path) -> grpc.GenericRpcHandler:
    models = {s["name"]: s for s in (json.loads(p.read_text()) for p in folder.glob("*/model-settings.json"))}

    async def model_config(request: bytes, context) -> bytes:
        settings = models.get(requested_name(request))
        if settings is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown model")
        return config_response(settings)

    return grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelConfig": grpc.unary_unary_rpc_method_handler(model_config)}
    )


def main() -> None:
    from mlserver.cli.main import main as mlserver_main
    from mlserver.grpc import server as grpc_server

    folder = Path(sys.argv[1]).resolve()
    create = grpc_server.GRPCServer._create_server

    def create_with_config(self):
        server = create(self)
        server.add_generic_rpc_handlers((config_handler(folder),))
        return server

    grpc_server.GRPCServer._create_server = create_with_config
    sys.argv = ["mlserver", "start", str(folder)]
    mlserver_main()


if __name__ == "__main__":
    main()
