"""ONNX Runtime sessions: provider choice (CUDA when present, else CPU) and batched runs."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)


def choose_providers(use_cuda: bool, available: list[str] | None = None) -> list[str]:
    """CUDA first when asked for and present, CPU always as the fallback."""
    available = ort.get_available_providers() if available is None else available
    if use_cuda and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtModel:
    """One loaded ONNX model; `run` is blocking and thread-safe (call it off the event loop)."""

    def __init__(self, path: Path, use_cuda: bool = True, intra_op_threads: int = 1):
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        # Intra-op threads sleep between calls instead of spinning: a server shares its cores
        # with its own event loop (and here with the front door and the client).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=choose_providers(use_cuda)
            )
        except Exception as exc:  # noqa: BLE001 - CUDA set-up failures fall back to CPU
            if not use_cuda:
                raise
            log.warning("CUDA session for %s failed (%s); falling back to CPU", path, exc)
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.provider = self.session.get_providers()[0]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self.output_names
        return dict(zip(names, self.session.run(names, inputs)))


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc), 0 where unknown."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def measure_latency_ms(model: OrtModel, inputs: dict[str, np.ndarray], warmup: int = 3, runs: int = 15) -> float:
    """Median wall time of one run on `inputs` after warm-up (blocking)."""
    for _ in range(warmup):
        model.run(inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model.run(inputs)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)
