"""Open-loop Poisson load over OIP gRPC, per-request records, and their summary (pure maths)."""
from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass

import grpc
import numpy as np

from services.common import grpc_util, oip
from services.pb.inference import grpc_service_pb2 as pb
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Sample:
    """One request: when it was due (s from the start), its latency measured from that moment,
    how late the generator sent it, and who answered (or the gRPC status when it failed)."""

    due_s: float
    latency_s: float
    send_lag_s: float
    ok: bool
    node: str = ""
    code: str = ""


def poisson_arrivals(rate: float, seconds: float, seed: int) -> list[float]:
    """Arrival offsets of a Poisson process: exponential gaps with mean 1/rate, up to `seconds`."""
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        out.append(t)


def infer_message(model: str, params: dict) -> pb.ModelInferRequest:
    x = np.random.default_rng(0).uniform(0, 16, (1, 64)).astype(np.float32)
    return oip.request_to_proto(oip.InferRequest(model_name=model, inputs={"input": x},
                                                 parameters=params))


async def _one(stub, message, due: float, origin: float, timeout_s: float) -> Sample:
    sent = time.perf_counter()
    try:
        reply = await stub.ModelInfer(message, timeout=timeout_s)
        node, ok, code = reply.parameters["cnei_node"].string_param, True, ""
    except grpc.aio.AioRpcError as exc:
        node, ok, code = "", False, exc.code().name
    end = time.perf_counter()
    return Sample(due - origin, end - due, sent - due, ok, node, code)


async def run_open_loop(target: str, model: str, rate: float, seconds: float, timeout_s: float,
                        seed: int, params: dict | None = None) -> list[Sample]:
    """Send one batch-1 request at each arrival, never waiting for answers; latency runs from
    the arrival time (so a late generator cannot hide queueing)."""
    message = infer_message(model, params or {})
    async with grpc.aio.insecure_channel(target, options=grpc_util.CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        await channel.channel_ready()
        origin = time.perf_counter() + 0.05
        tasks = []
        for offset in poisson_arrivals(rate, seconds, seed):
            due = origin + offset
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.ensure_future(_one(stub, message, due, origin, timeout_s)))
        return list(await asyncio.gather(*tasks))


def percentile_ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q) * 1e3) if values else None


def summarise(samples: list[Sample], window_s: float, timeout_s: float) -> dict:
    """Latency percentiles over every request, a failed one counted at the full timeout (what it
    cost its caller); success rate; per-node share of the answered requests; error codes."""
    latencies = [s.latency_s if s.ok else max(s.latency_s, timeout_s) for s in samples]
    good = [s for s in samples if s.ok]
    by_node = Counter(s.node for s in good)
    return {
        "requests": len(samples), "ok": len(good),
        "offered_rps": round(len(samples) / window_s, 1), "goodput_rps": round(len(good) / window_s, 1),
        "success_rate": len(good) / len(samples) if samples else 0.0,
        "p50_ms": percentile_ms(latencies, 50), "p90_ms": percentile_ms(latencies, 90),
        "p99_ms": percentile_ms(latencies, 99), "max_ms": percentile_ms(latencies, 100),
        "mean_ms": float(np.mean(latencies) * 1e3) if latencies else None,
        "send_lag_p99_ms": percentile_ms([s.send_lag_s for s in samples], 99),
        "node_share": {n: c / len(good) for n, c in sorted(by_node.items())},
        "node_p99_ms": {n: percentile_ms([s.latency_s for s in good if s.node == n], 99)
                        for n in sorted(by_node)},
        "node_min_ms": {n: percentile_ms([s.latency_s for s in good if s.node == n], 0)
                        for n in sorted(by_node)},
        "errors": dict(Counter(s.code for s in samples if not s.ok)),
    }


async def compute_ns(address: str, model: str) -> int:
    """Total ONNX Runtime time (emulated slowdown included) a runtime has spent on `model`."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reply = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=5.0)
    return sum(s.inference_stats.compute_infer.ns for s in reply.model_stats)


async def compute_snapshot(addresses: dict[str, str], model: str) -> dict[str, int]:
    values = await asyncio.gather(*(compute_ns(a, model) for a in addresses.values()))
    return dict(zip(addresses, values))
