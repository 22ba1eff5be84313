"""Triton's Prometheus metric names over the statistics every server keeps, so dashboards,
alerts and autoscalers written for Triton (`nv_inference_queue_duration_us` and friends) read
a CNEI coordinator or edge runtime unchanged. Exposed untyped: Triton's counters carry no
`_total` suffix, which prometheus_client would add to a counter."""
from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import REGISTRY, CollectorRegistry, Metric, UnknownMetricFamily

from services.common.stats import ModelStats

# (name, help, value of one ModelStats)
METRICS: list[tuple[str, str, Callable[[ModelStats], float]]] = [
    ("nv_inference_request_success", "Number of successful inference requests, all batch sizes",
     lambda s: s.success.count),
    ("nv_inference_request_failure", "Number of failed inference requests, all batch sizes",
     lambda s: s.fail.count),
    ("nv_inference_count", "Number of inferences performed (a batch of n counts n; cache hits not included)",
     lambda s: s.inference_count),
    ("nv_inference_exec_count", "Number of model executions performed (batches)",
     lambda s: s.execution_count),
    # successful requests only (cache hits included), as Triton's UpdateSuccess: a failure adds
    # to nv_inference_request_failure and nothing else, so duration / success is the mean latency
    ("nv_inference_request_duration_us", "Cumulative inference request duration in microseconds",
     lambda s: s.success.ns // 1000),
    ("nv_inference_queue_duration_us", "Cumulative inference queuing duration in microseconds",
     lambda s: s.queue.ns // 1000),
    ("nv_inference_compute_infer_duration_us", "Cumulative compute inference duration in microseconds",
     lambda s: s.compute_infer.ns // 1000),
    ("nv_cache_num_hits_per_model", "Number of response cache hits per model", lambda s: s.cache_hit.count),
    ("nv_cache_hit_duration_per_model", "Total cache hit duration per model, in microseconds",
     lambda s: s.cache_hit.ns // 1000),
    ("nv_cache_num_misses_per_model", "Number of response cache misses per model", lambda s: s.cache_miss.count),
    ("nv_cache_miss_duration_per_model", "Total cache miss (lookup and insert) duration per model, in microseconds",
     lambda s: s.cache_miss.ns // 1000),
]


class TritonMetrics:
    """A Prometheus collector reading `select()` (every model version's statistics) per scrape."""

    def __init__(self, select: Callable[[], list[ModelStats]]):
        self.select = select

    def collect(self) -> Iterator[Metric]:
        stats = self.select()
        for name, text, value in METRICS:
            family = UnknownMetricFamily(name, text, labels=["model", "version"])
            for s in stats:
                family.add_metric([s.name, s.version], float(value(s)))
            yield family


def register(select: Callable[[], list[ModelStats]], registry: CollectorRegistry = REGISTRY) -> None:
    registry.register(TritonMetrics(select))
