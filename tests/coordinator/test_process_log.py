"""What a coordinator process logs about itself as it starts and stops."""
from __future__ import annotations

from tests.coordinator.coordinator_process import run_and_stop


def test_a_coordinator_names_itself_once_when_it_serves_and_when_it_shuts_down(nats_server, redis_server, tmp_path):
    records = run_and_stop(nats_server, redis_server, tmp_path / "coordinator.log", CNEI_COORDINATOR_FRONT_DOOR="off")
    messages = [r["msg"] for r in records if r["logger"] == "services.coordinator"]
    assert "coordinator shutting down" in messages
    assert any(m.startswith("coordinator serving gRPC on ") for m in messages), messages
    assert not [m for m in messages if "coordinator coordinator" in m]
