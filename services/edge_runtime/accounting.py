"""What an inference costs: queue/compute time, energy and money, by model and node."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter, Histogram

_LABELS = ["model", "version", "precision", "node", "tier"]
_TIME_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2)

REQUESTS = Counter("cnei_runtime_requests_total", "Inference requests run by this node",
                   _LABELS + ["outcome"])
INFERENCES = Counter("cnei_runtime_inferences_total", "Samples inferred (batch rows)", _LABELS)
QUEUE_SECONDS = Histogram("cnei_runtime_queue_seconds", "Wait for an ONNX Runtime worker", _LABELS,
                          buckets=_TIME_BUCKETS)
COMPUTE_SECONDS = Histogram("cnei_runtime_compute_seconds", "ONNX Runtime run time", _LABELS,
                            buckets=_TIME_BUCKETS)
ENERGY = Counter("cnei_inference_energy_joules_total",
                 "Estimated energy: GPU power x run time over NVML on CUDA, else CPU seconds x watts per core",
                 _LABELS + ["source"])
COST = Counter("cnei_inference_cost_total",
               "Estimated cost in the configured currency: compute plus network", _LABELS)
NETWORK_BYTES = Counter("cnei_inference_network_bytes_total", "Tensor bytes received and sent", _LABELS)


@dataclass(frozen=True)
class CostModel:
    """Per-tier prices, as in the cost-optimisation design."""

    cost_per_cpu_second: float
    cost_per_network_mb: float

    def cost(self, cpu_seconds: float, network_bytes: int) -> float:
        return cpu_seconds * self.cost_per_cpu_second + network_bytes / 1e6 * self.cost_per_network_mb


def tensor_bytes(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))


def timed_run(run, *args):
    """Run a blocking call on a worker thread, returning (result, cpu_seconds, start_ns)."""
    start_ns = time.perf_counter_ns()
    cpu = time.thread_time()
    result = run(*args)
    return result, time.thread_time() - cpu, start_ns


@functools.lru_cache(maxsize=None)
def _series(values: tuple[str, ...], source: str) -> tuple:
    """The labelled children of every accounting metric for one label set, looked up once
    (a `labels()` call costs more than the update it leads to)."""
    return (REQUESTS.labels(*values, "ok"), INFERENCES.labels(*values), QUEUE_SECONDS.labels(*values),
            COMPUTE_SECONDS.labels(*values), ENERGY.labels(*values, source), COST.labels(*values),
            NETWORK_BYTES.labels(*values))


def record_request(labels: dict[str, str], queue_s: float, energy_source: str) -> None:
    """One request served: its wait for ONNX Runtime (in the batcher's queue, or for a worker)."""
    requests, _, queue, *_ = _series(tuple(labels[k] for k in _LABELS), energy_source)
    requests.inc()
    queue.observe(queue_s)


def record_run(labels: dict[str, str], model: CostModel, rows: int, compute_s: float, cpu_seconds: float,
               network_bytes: int, energy_joules: float, energy_source: str) -> None:
    """One ONNX Runtime call, for every request it carried: rows, run time, energy, cost, bytes."""
    _, inferences, _, compute, energy, cost, network = _series(tuple(labels[k] for k in _LABELS), energy_source)
    inferences.inc(rows)
    compute.observe(compute_s)
    energy.inc(energy_joules)
    cost.inc(model.cost(cpu_seconds, network_bytes))
    network.inc(network_bytes)
