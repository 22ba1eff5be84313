"""`cnei deploy delete` on a running mesh (a coordinator keeping registry answers ten minutes, so
only the deletion's event can make it read again): an ensemble deleted is NOT_FOUND at once over
gRPC and REST; a model whose deployment pinned version 1 is served with the defaults (its latest
version) by the coordinator and by a runtime asked directly, and its versions, the last one too,
can then be deleted."""
from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as triton

from services.cli import infra
from services.common.deployment import BatchingSpec, DeploymentSpec, EnsembleStep, RolloutSpec
from tests.e2e.processes import (assert_refused, push_digits_as, put_deployment, rest_json, run_cnei, server_ready,
                                 start_coordinator)

MODEL, PIPELINE = "digits-undeployed", "digits-undeployed-pipe"


@pytest.fixture(scope="module")
def coordinator(mesh):
    """(gRPC address, REST base URL) of a coordinator that reuses registry answers ten minutes."""
    proc, address, http_port, _ = start_coordinator(mesh, export_spans=False, CNEI_COORDINATOR_RESOLVE_TTL_S="600")
    try:
        infra.wait_until(lambda: server_ready(address), 30, "the coordinator ready")
        yield address, f"http://127.0.0.1:{http_port}"
    finally:
        infra.stop(proc)


def infer(address: str, model: str, tensor: str = "input"):
    client = triton.InferenceServerClient(address)
    try:
        data = triton.InferInput(tensor, [1, 64], "FP32")
        data.set_data_from_numpy(np.ones((1, 64), np.float32))
        return client.infer(model, [data], client_timeout=30).get_response()
    finally:
        client.close()


def rest_infer(url: str, model: str) -> tuple[int, object]:
    body = {"inputs": [{"name": "image", "shape": [1, 64], "datatype": "FP32", "data": [1.0] * 64}]}
    return rest_json(f"{url}/v2/models/{model}/infer", "POST", body, timeout=30)


def cnei(mesh, *args: str):
    return run_cnei(*args, "--registry", mesh.registry, timeout=60)


def test_a_deleted_ensemble_is_not_found_at_once_over_grpc_and_rest(mesh, digits_models, coordinator):
    address, url = coordinator
    push_digits_as(mesh, digits_models, f"{MODEL}-step")
    put_deployment(mesh, DeploymentSpec(PIPELINE, ensemble=(
        EnsembleStep(f"{MODEL}-step", inputs=("input=image",), outputs=("probabilities=p",)),)))
    assert infer(address, PIPELINE, "image").outputs[0].name == "p"
    assert rest_infer(url, PIPELINE)[0] == 200
    out = cnei(mesh, "deploy", "delete", PIPELINE)
    assert out.returncode == 0 and f"deployment of model '{PIPELINE}' deleted" in out.stdout, out.stderr
    infra.wait_until(lambda: rest_infer(url, PIPELINE)[0] == 404, 10, "the ensemble NOT_FOUND over REST")
    assert_refused(infer, address, PIPELINE, "image", status="NOT_FOUND", match=PIPELINE)
    assert rest_json(f"{url}/v2/models/{PIPELINE}")[0] == 404
    assert infer(address, f"{MODEL}-step").model_name == f"{MODEL}-step"  # its step's model serves on


def test_a_model_whose_deployment_is_deleted_is_served_with_the_defaults_and_its_versions_can_go(
        mesh, digits_models, coordinator):
    address, _ = coordinator
    for version in ("1", "2"):
        push_digits_as(mesh, digits_models, MODEL, version)
    put_deployment(mesh, DeploymentSpec(MODEL, batching=BatchingSpec(max_batch_size=8), rollout=RolloutSpec("1")))
    edge = mesh.runtime("edge-a1")
    infra.wait_until(lambda: infer(address, MODEL).model_version == "1", 10, "the coordinator on the pinned version")
    assert infer(edge, MODEL).model_version == "1"  # the runtime keeps what it read 30 s
    refused = cnei(mesh, "model", "delete", MODEL, "1")
    assert refused.returncode == 2 and "its deployment pins it as the stable version" in refused.stderr
    out = cnei(mesh, "deploy", "delete", MODEL)
    assert out.returncode == 0 and '"stable": "1"' in out.stdout, out.stderr
    infra.wait_until(lambda: infer(address, MODEL).model_version == "2", 10, "the coordinator on the latest version")
    infra.wait_until(lambda: infer(edge, MODEL).model_version == "2", 10, "the runtime on the latest version")
    for version in ("1", "2"):
        deleted = cnei(mesh, "model", "delete", MODEL, version)
        assert deleted.returncode == 0 and f"deleted {MODEL}:{version}:FP32" in deleted.stdout, deleted.stderr
    infra.wait_until(lambda: rest_json(f"{coordinator[1]}/v2/models/{MODEL}")[0] == 404, 10, "the model gone")
