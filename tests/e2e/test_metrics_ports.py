"""Every service's metrics port answers /metrics and nothing else: a probe or scrape pointed at
another path (a readiness probe at the wrong port) is 404, not the metrics text with 200."""
from __future__ import annotations

import pytest

from services.cli.up import RUNTIMES
from tests.http_reading import get

SERVICES = ["registry", "coordinator", "trainer", *(node_id for node_id, _, _ in RUNTIMES)]


def _metrics_port(settings, service: str) -> int:
    named = {"registry": settings.registry_metrics_port, "coordinator": settings.metrics_port,
             "trainer": settings.trainer_metrics_port}
    if service in named:
        return named[service]
    return settings.runtime_metrics_base_port + [r[0] for r in RUNTIMES].index(service)


@pytest.mark.parametrize("service", SERVICES)
def test_a_services_metrics_port_serves_the_metrics_at_slash_metrics(mesh, service):
    status, text = get(_metrics_port(mesh.settings, service), "/metrics")
    assert status == 200 and "# TYPE" in text


@pytest.mark.parametrize("path", ["/v2/health/ready", "/v2/health/live", "/nonexistent", "/", "/metrics/x"])
@pytest.mark.parametrize("service", SERVICES)
def test_a_services_metrics_port_answers_404_at_any_other_path(mesh, service, path):
    status, text = get(_metrics_port(mesh.settings, service), path)
    assert status == 404, (status, text[:200])
    assert "/metrics" in text and "# TYPE" not in text
