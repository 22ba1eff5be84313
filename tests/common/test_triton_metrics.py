"""Triton's metric names over CNEI statistics, as a Prometheus scrape shows them."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.common import triton_metrics
from services.common.stats import StatsBook


def test_statistics_appear_under_tritons_metric_names_and_labels():
    book = StatsBook()
    book.get("digits", "1").record(True, 2_000_000, batch=8, queue_ns=500_000, compute_ns=1_000_000)
    book.get("digits", "1").record(True, 1_000_000, batch=2, queue_ns=0, compute_ns=400_000)
    book.get("digits", "1").record(False, 3_000_000)
    book.get("digits", "1").record(True, 1_000_000, batch=4, queue_ns=0, executed=False, cache_hit=True)
    book.get("wide", "2")
    registry = CollectorRegistry()
    triton_metrics.register(book.select, registry)
    text = generate_latest(registry).decode()
    samples = {(s.name, s.labels["model"], s.labels["version"]): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("nv_inference_request_success", "digits", "1")] == 3  # the cache hit too
    assert samples[("nv_inference_request_failure", "digits", "1")] == 1
    assert samples[("nv_inference_count", "digits", "1")] == 10  # not the cache hit's 4 rows (Triton)
    assert samples[("nv_inference_exec_count", "digits", "1")] == 2
    # successes only (Triton's UpdateSuccess), so duration / success is their mean latency
    assert samples[("nv_inference_request_duration_us", "digits", "1")] == 4000
    assert samples[("nv_inference_queue_duration_us", "digits", "1")] == 500
    assert samples[("nv_inference_compute_infer_duration_us", "digits", "1")] == 1400
    assert samples[("nv_inference_request_success", "wide", "2")] == 0
    assert "nv_inference_request_success_total" not in text  # Triton's names, no suffix added
