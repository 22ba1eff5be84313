"""Runtime-core fixtures: a real `python -m services.registry` process on a free port (against
the session's real NATS), with the digits FP32 file to push under any model name."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from services.cli import infra
from services.common.registry_client import RegistryClient


@pytest.fixture(scope="module")
def registry(nats_server, tmp_path_factory) -> str:
    """The address of a registry of this module's own."""
    port, data = infra.free_port(), tmp_path_factory.mktemp("registry")
    env = {**os.environ, "CNEI_REGISTRY_HOST": "127.0.0.1", "CNEI_REGISTRY_PORT": str(port),
           "CNEI_REGISTRY_METRICS_PORT": "0", "CNEI_REGISTRY_DATA_DIR": str(data / "data"),
           "CNEI_REGISTRY_NATS_URL": nats_server, "OTEL_EXPORTER_OTLP_ENDPOINT": ""}
    with (data / "registry.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.registry"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        infra.wait_for_port("127.0.0.1", port, timeout=30, proc=proc)
        yield f"127.0.0.1:{port}"
    finally:
        infra.stop(proc)


@pytest.fixture
def push_digits(registry, digits_models):
    """Push the digits FP32 file as version 1 of a model named after the given prefix and a
    fresh suffix (a module shares one registry); returns its variant."""
    fp32 = next(v for v in digits_models if v.precision == "FP32")

    async def push(prefix: str):
        client = RegistryClient(registry, timeout=30)
        try:
            return await client.push_file(fp32.path, f"{prefix}-{uuid.uuid4().hex[:8]}", "1", "FP32", fp32.metadata)
        finally:
            await client.close()
    return push
