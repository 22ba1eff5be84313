"""A coordinator process on free ports against the session's NATS and Redis (its registry
nowhere), started and stopped: the JSON records of its log."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from services.cli import infra


def run_and_stop(nats_url: str, redis_url: str, log_file: Path, until: bytes = b"", **env_extra: str) -> list[dict]:
    """Start a coordinator, wait for its gRPC port (and for `until` in its log), SIGTERM it: the
    records of its stderr (every line must be JSON)."""
    grpc_port = infra.free_port()
    env = {**os.environ, "CNEI_COORDINATOR_GRPC_PORT": str(grpc_port),
           "CNEI_COORDINATOR_HTTP_PORT": str(infra.free_port()), "CNEI_COORDINATOR_METRICS_PORT": str(infra.free_port()),
           "CNEI_COORDINATOR_REGISTRY_TARGET": f"127.0.0.1:{infra.free_port()}",
           "CNEI_COORDINATOR_REDIS_URL": redis_url, "CNEI_COORDINATOR_NATS_URL": nats_url, **env_extra}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    with log_file.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "services.coordinator"], env=env,
                                stdout=subprocess.DEVNULL, stderr=sink)
        try:
            infra.wait_for_port("127.0.0.1", grpc_port, proc=proc, timeout=60)
            infra.wait_until(lambda: until in log_file.read_bytes(), 15, f"{until!r} in the coordinator's log")
        finally:
            infra.stop(proc)
    return [json.loads(line) for line in log_file.read_text().splitlines()]
