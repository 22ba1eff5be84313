"""An edge runtime that holds version 1 of a model pulls version 2 as a delta against it (the
registry's FetchArtifact with `have`), serves exactly version 2, and says so in its metrics."""
from __future__ import annotations

import asyncio
import re
import urllib.request
import uuid

import numpy as np
import onnxruntime as ort
import tritonclient.grpc as triton

from services.cli.up import RUNTIMES
from services.common.registry_client import RegistryClient
from services.models.digits import load_all
from tests.retrained import write_versions

NODE = "edge-a1"


def _pulls(mesh) -> tuple[float, float, float]:
    """The runtime's (whole pulls, delta pulls, bytes pulled) so far."""
    port = mesh.settings.runtime_metrics_base_port + [r[0] for r in RUNTIMES].index(NODE)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()

    def value(pattern: str) -> float:
        found = re.search(pattern, text, re.M)
        return float(found.group(1)) if found else 0.0
    return (value(r'^cnei_artifact_pulls_total\{encoding="full"\} (\S+)$'),
            value(r'^cnei_artifact_pulls_total\{encoding="delta"\} (\S+)$'),
            value(r"^cnei_artifact_bytes_synced_total (\S+)$"))


def _infer(mesh, model: str, version: str, x: np.ndarray) -> np.ndarray:
    client = triton.InferenceServerClient(mesh.runtime(NODE))
    try:
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        reply = client.infer(model, [tensor], model_version=version, client_timeout=30)
        assert reply.get_response().model_version == version
        return reply.as_numpy("probabilities")
    finally:
        client.close()


def test_a_runtime_holding_version_1_pulls_version_2_as_a_delta_and_serves_it_exactly(mesh, tmp_path):
    model = f"retrained-{uuid.uuid4().hex[:8]}"
    v1_file, v2_file = write_versions(tmp_path)

    async def push(path, version):
        client = RegistryClient(mesh.registry)
        try:
            return await client.push_file(path, model, version, "FP32")
        finally:
            await client.close()

    x, _ = load_all()
    asyncio.run(push(v1_file, "1"))
    _infer(mesh, model, "1", x[:8])  # the node pulls version 1 (whole: it holds no other version)
    full_before, delta_before, bytes_before = _pulls(mesh)
    v2 = asyncio.run(push(v2_file, "2"))
    served = _infer(mesh, model, "2", x[:64])
    full, deltas, pulled = _pulls(mesh)
    assert full == full_before and deltas > delta_before, "version 2 was not pulled as a delta"
    assert pulled - bytes_before < 0.1 * v2.size_bytes * (deltas - delta_before), \
        f"{pulled - bytes_before:.0f} bytes pulled for a {v2.size_bytes}-byte artifact"
    expected = ort.InferenceSession(str(v2_file), providers=["CPUExecutionProvider"]).run(None, {"input": x[:64]})[0]
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
