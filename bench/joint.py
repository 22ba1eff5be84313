"""Joint edge-cloud inference on the digits test set: accuracy, mean latency and the share of
rows escalated, for edge-only, cloud-only, joint sync and joint async.

    .venv/bin/python -m bench.joint [--threshold 0.9] [--out bench/results]

Edge model: digits-tiny INT8 on the edge tier; cloud model: digits-large FP32 on the cloud tier;
each test image is one request through the coordinator (tritonclient over gRPC)."""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton

from bench.cnei_stack import CneiStack
from services.common.deployment import DeploymentSpec, JointSpec
from services.common.registry_client import RegistryClient
from services.models import digits


def run_mode(target: str, model: str, x: np.ndarray, y: np.ndarray, params: dict) -> dict:
    client = triton.InferenceServerClient(target)
    latencies, correct, escalated = [], 0, 0
    for i in range(len(x)):
        tensor = triton.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(x[i:i + 1])
        start = time.perf_counter()
        reply = client.infer(model, [tensor], parameters=params or None, client_timeout=30)
        latencies.append(time.perf_counter() - start)
        correct += int(reply.as_numpy("probabilities").argmax() == y[i])
        p = reply.get_response().parameters
        escalated += p["cnei_escalated"].int64_param if "cnei_escalated" in p else 0
    client.close()
    return {"accuracy": correct / len(x), "mean_latency_ms": float(np.mean(latencies) * 1e3),
            "p99_latency_ms": float(np.percentile(latencies, 99) * 1e3), "escalated": escalated / len(x)}


async def apply(registry: str, mode: str, threshold: float) -> None:
    client = RegistryClient(registry)
    try:
        await client.put_deployment(DeploymentSpec(model=digits.TINY_NAME, joint=JointSpec(
            mode=mode, edge_precision="INT8", cloud_model=digits.LARGE_NAME, threshold=threshold)))
    finally:
        await client.close()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.joint", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threshold", type=float, default=0.9,
                    help="joint sync: rows whose top-1 confidence at the edge is below this go to the cloud "
                         "(default 0.9)")
    ap.add_argument("--out", default="bench/results",
                    help="directory for joint.md and joint.json (default bench/results)")
    args = ap.parse_args()
    root = Path(".bench/joint")
    models = {digits.TINY_NAME: digits.build_tiny(Path(".bench/models")),
              digits.LARGE_NAME: digits.build_large(Path(".bench/models"))}
    stack = CneiStack(root, runtimes=3)
    rows = {}
    try:
        stack.start(models)
        registry = f"127.0.0.1:{stack.settings.registry_port}"
        _, x, _, y = digits.load_split()
        stack.warm([(digits.TINY_NAME, "INT8"), (digits.LARGE_NAME, "FP32")])
        rows["edge-only (tiny INT8)"] = run_mode(stack.coordinator, digits.TINY_NAME, x, y,
                                                 {"joint": "off", "tier": "edge", "precision": "INT8"})
        rows["cloud-only (large FP32)"] = run_mode(stack.coordinator, digits.LARGE_NAME, x, y,
                                                   {"tier": "cloud"})
        for mode in ("sync", "async"):
            asyncio.run(apply(registry, mode, args.threshold))
            time.sleep(2.5)  # deployment cache TTL
            rows[f"joint {mode} (threshold {args.threshold})"] = run_mode(
                stack.coordinator, digits.TINY_NAME, x, y, {})
    finally:
        stack.stop()
    lines = ["| mode | accuracy | mean latency ms | p99 ms | escalated |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['accuracy']:.4f} | {r['mean_latency_ms']:.2f} | "
                     f"{r['p99_latency_ms']:.2f} | {r['escalated']:.1%} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "joint.md").write_text(f"# Joint inference on the digits test set ({len(y)} images)\n\n{table}\n")
    (out / "joint.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
