"""`cnei model delete` on a running mesh: the deletion's event makes a coordinator drop the version
from its catalog at once (its registry answers kept ten minutes here), so requests naming no
version go to the version left, and one naming the deleted version is NOT_FOUND."""
from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from services.cli import infra
from tests.e2e.processes import push_digits_as, run_cnei, server_ready, start_coordinator

MODEL = "digits-deleted"


def served(address: str, version: str = "") -> str:
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
    client = triton.InferenceServerClient(address)
    try:
        return client.infer(MODEL, [tensor], model_version=version, client_timeout=30).get_response().model_version
    finally:
        client.close()


def test_a_deleted_version_leaves_a_coordinators_catalog_at_once(mesh, digits_models):
    proc, address, _, _ = start_coordinator(mesh, export_spans=False, CNEI_COORDINATOR_RESOLVE_TTL_S="600")
    try:
        infra.wait_until(lambda: server_ready(address), 30, "the coordinator ready")
        for version in ("1", "2"):
            push_digits_as(mesh, digits_models, MODEL, version)
        assert served(address) == "2"
        out = run_cnei("model", "delete", MODEL, "2", "--registry", mesh.registry, timeout=60)
        assert out.returncode == 0 and f"deleted {MODEL}:2:FP32" in out.stdout, out.stderr
        infra.wait_until(lambda: served(address) == "1", 10, "requests naming no version on version 1")
        with pytest.raises(InferenceServerException, match="NOT_FOUND"):
            served(address, "2")
    finally:
        infra.stop(proc)
