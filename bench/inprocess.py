"""The physical limit: an ONNX Runtime session called in a loop in this process, no network."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

INTRA_OP_THREADS = 2
WARMUP_CALLS = 20


@dataclass(frozen=True)
class InProcessPoint:
    model: str
    precision: str
    batch: int
    samples_per_s: float
    calls_per_s: float
    p50_us: float
    p99_us: float

    def as_dict(self) -> dict:
        return asdict(self)


def session(path: Path, threads: int = INTRA_OP_THREADS) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(model: str, precision: str, path: Path, batch: int, seconds: float) -> InProcessPoint:
    """Call `run` back to back for `seconds` on random pixel-like inputs of `batch` rows."""
    sess = session(path)
    spec = sess.get_inputs()[0]
    x = np.random.default_rng(0).uniform(0, 16, (batch, spec.shape[1])).astype(np.float32)
    feeds = {spec.name: x}
    for _ in range(WARMUP_CALLS):
        sess.run(None, feeds)
    latencies = []
    start = time.perf_counter()
    end = start + seconds
    while (t0 := time.perf_counter()) < end:
        sess.run(None, feeds)
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    p50, p99 = np.percentile(latencies, [50, 99]) * 1e6
    calls = len(latencies) / elapsed
    return InProcessPoint(model, precision, batch, calls * batch, calls, float(p50), float(p99))
