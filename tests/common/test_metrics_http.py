"""The shared metrics server: a registry's text at /metrics, 404 naming /metrics at other paths."""
from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter

from services.cli import infra
from services.common.metrics_http import start_metrics_server
from tests.http_reading import get


@pytest.fixture(scope="module")
def metrics_port():
    registry = CollectorRegistry()
    Counter("cnei_test_things", "things counted", registry=registry).inc(3)
    port = infra.free_port()
    server = start_metrics_server("127.0.0.1", port, registry)
    yield port
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("path", ["/metrics", "/metrics?name[]=cnei_test_things_total"])
def test_the_registry_is_served_at_slash_metrics(metrics_port, path):
    status, text = get(metrics_port, path)
    assert status == 200 and "cnei_test_things_total 3.0" in text


@pytest.mark.parametrize("path", ["/", "/v2/health/ready", "/favicon.ico", "/metrics/", "/nonexistent"])
def test_any_other_path_is_404_naming_slash_metrics(metrics_port, path):
    status, text = get(metrics_port, path)
    assert status == 404 and "/metrics" in text and "cnei_test_things" not in text


def test_port_zero_serves_nothing():
    assert start_metrics_server("127.0.0.1", 0) is None
