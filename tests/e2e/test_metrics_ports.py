"""Every service's metrics port answers /metrics and nothing else: a probe or scrape pointed at
another path (a readiness probe at the wrong port) is 404, not the metrics text with 200."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from services.cli.up import RUNTIMES

SERVICES = ["registry", "coordinator", "trainer", *(node_id for node_id, _, _ in RUNTIMES)]


def _metrics_port(settings, service: str) -> int:
    named = {"registry": settings.registry_metrics_port, "coordinator": settings.metrics_port,
             "trainer": settings.trainer_metrics_port}
    if service in named:
        return named[service]
    return settings.runtime_metrics_base_port + [r[0] for r in RUNTIMES].index(service)


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("service", SERVICES)
def test_a_services_metrics_port_serves_the_metrics_at_slash_metrics(mesh, service):
    status, text = _get(_metrics_port(mesh.settings, service), "/metrics")
    assert status == 200 and "# TYPE" in text


@pytest.mark.parametrize("path", ["/v2/health/ready", "/v2/health/live", "/nonexistent", "/", "/metrics/x"])
@pytest.mark.parametrize("service", SERVICES)
def test_a_services_metrics_port_answers_404_at_any_other_path(mesh, service, path):
    status, text = _get(_metrics_port(mesh.settings, service), path)
    assert status == 404, (status, text[:200])
    assert "/metrics" in text and "# TYPE" not in text
