"""`cnei infer`: one inference through the coordinator (or a node), its input made from the
command line (`--data`, `--digits`, random rows) and its OIP parameters from `--param`."""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from services.cli import clients


def check_counts(args) -> None:
    """`--digits N` and `--batch N` as the rows they ask for: INVALID_ARGUMENT naming the flag
    for counts that are none or more than there are (before any server is called)."""
    from services.common.errors import InvalidArgument

    if args.digits is not None:
        from services.models.digits import load_all

        held = len(load_all()[0])
        if not 1 <= args.digits <= held:
            raise InvalidArgument(f"--digits must be from 1 to {held} (the load_digits images), not {args.digits}")
    if args.batch < 1:
        raise InvalidArgument(f"--batch must be at least 1, not {args.batch}")


def _input_array(args, spec) -> np.ndarray:
    if args.digits is not None:
        from services.models.digits import load_all

        return load_all()[0][: args.digits]
    if args.data:
        from services.common import codec

        return np.asarray(json.loads(args.data), dtype=codec.datatype(spec.datatype).dtype)
    shape = [args.batch if d < 0 else d for d in spec.shape]
    return np.random.default_rng(0).random(shape).astype(np.float32)


def _parameter_value(text: str) -> bool | int | float | str:
    """A `--param` value as the OIP parameter type it reads as: true/false, an integer, a
    number, else a string (`precision=INT8`, `accuracy_floor=0.95`, `priority=1`)."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def request_parameters(pairs: list[str]) -> dict:
    """`--param KEY=VALUE` flags -> the request's OIP parameters (`clients.key_values`)."""
    return {key: _parameter_value(value) for key, value in clients.key_values(pairs, "--param").items()}


async def infer(args) -> int:
    from services.common import grpc_util, oip
    from services.pb.inference import grpc_service_pb2 as pb
    from services.pb.inference import grpc_service_pb2_grpc as pb_grpc

    params = request_parameters(args.param)
    check_counts(args)
    if args.precision:
        params["precision"] = args.precision
    async with grpc_util.channel(args.url, credentials=clients.credentials(args)) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        metadata = clients.headers(args)
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=args.model), timeout=10, metadata=metadata)
        spec = meta.inputs[0]
        array = _input_array(args, spec)
        request = oip.InferRequest(model_name=args.model, inputs={spec.name: array}, parameters=params)
        start = time.perf_counter()
        reply = await stub.ModelInfer(oip.request_to_proto(request), timeout=30, metadata=metadata)
        elapsed = (time.perf_counter() - start) * 1000
    response = oip.response_from_proto(reply)
    for name, out in response.outputs.items():
        print(f"{name} {out.dtype} {list(out.shape)}")
        if out.ndim == 2 and out.dtype.kind == "f":
            print("  top-1:", out.argmax(axis=1).tolist())
        else:
            print(" ", out.tolist())
    print(f"served by {response.parameters} v{response.model_version} in {elapsed:.2f} ms")
    return 0



def add_parser(sub) -> argparse.ArgumentParser:
    inf = sub.add_parser("infer", help="run one inference through the coordinator (or a node)")
    inf.add_argument("model")
    inf.add_argument("--url", default="127.0.0.1:8001")
    inf.add_argument("--data", help="input as a JSON (nested) list")
    inf.add_argument("--digits", type=int, help="use the first N load_digits samples")
    inf.add_argument("--batch", type=int, default=1, help="batch size of random input")
    inf.add_argument("--precision", default="")
    inf.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                     help="an OIP request parameter (repeatable), e.g. accuracy_floor=0.95, "
                          "latency_budget_ms=2, region=site-b, priority=1, timeout_us=50000")
    return inf
