"""Triton's batch-size check end to end: a client's request of more rows than the max_batch_size a
server's ModelConfig shows is INVALID_ARGUMENT in Triton's words, at the coordinator behind its
compiled front door and without it (gRPC and REST v2), and at an edge runtime called directly;
the coordinator's batches of more rows than the runtimes show their own clients (a deployment
batching 128 rows over runtimes merging 64) are still served, by the door straight from the node."""
from __future__ import annotations


import pytest
import tritonclient.grpc as triton

from services.cli import infra
from services.common.deployment import BatchingSpec, DeploymentSpec
from services.coordinator.door_process import BUILT
from services.models.digits import load_all
from tests.e2e.processes import (answered_by_door, assert_refused, push_digits_as, put_deployment, server_ready,
                                 rest_json, start_coordinator, start_door)

WIDE = "digits-wide-batches"  # deployed to batch 128 rows; the runtimes merge 64 at most


@pytest.fixture(scope="module")
def coordinators(mesh, digits_models):
    """{"door": (gRPC address, REST url), "no door": ...}: a coordinator behind its compiled front
    door and one without it, WIDE pushed and deployed."""
    if not BUILT.is_file():
        pytest.skip(f"front door not built ({BUILT}): make frontdoor")
    push_digits_as(mesh, digits_models, WIDE)
    put_deployment(mesh, DeploymentSpec(model=WIDE, batching=BatchingSpec(max_batch_size=128)))
    door, door_address, _ = start_door(mesh)
    plain, plain_address, plain_http, _ = start_coordinator(mesh, CNEI_COORDINATOR_FRONT_DOOR="off")
    try:
        infra.wait_until(lambda: server_ready(plain_address), 30, "the coordinator without a door ready")
        yield {"door": door_address, "no door": plain_address}, f"http://127.0.0.1:{plain_http}"
    finally:
        infra.stop(plain)
        infra.stop(door)


def _infer(address: str, model: str, rows: int):
    client = triton.InferenceServerClient(address)
    try:
        tensor = triton.InferInput("input", [rows, 64], "FP32")
        tensor.set_data_from_numpy(load_all()[0][:rows])
        return client.infer(model, [tensor], client_timeout=30)
    finally:
        client.close()


def _shown(address: str, model: str) -> int:
    client = triton.InferenceServerClient(address)
    try:
        return client.get_model_config(model).config.max_batch_size
    finally:
        client.close()


def _served(address: str, model: str, rows: int, by_door: bool) -> bool:
    reply = _infer(address, model, rows)
    return reply.as_numpy("probabilities").shape == (rows, 10) and answered_by_door(reply) == by_door


def _rest_infer(url: str, model: str, rows: int) -> tuple[int, dict]:
    x = load_all()[0][:rows]
    body = {"inputs": [{"name": "input", "shape": [rows, 64], "datatype": "FP32", "data": x.ravel().tolist()}]}
    return rest_json(f"{url}/v2/models/{model}/infer", "POST", body, timeout=30)


@pytest.mark.parametrize(("model", "shown"), [("digits", 64), (WIDE, 128)], ids=["digits", "wide"])
@pytest.mark.parametrize("path", ["door", "no door"])
def test_a_request_over_the_max_batch_size_the_coordinator_shows_is_refused_in_tritons_words(
        coordinators, path, model, shown):
    addresses, _ = coordinators
    address = addresses[path]
    infra.wait_until(lambda: _shown(address, model) == shown, 15, f"{model}'s config showing {shown}")
    # served whole: the door's batch of `shown` rows (more than a runtime merges) goes straight to the node
    infra.wait_until(lambda: _served(address, model, shown, by_door=path == "door"), 30, f"{shown} rows served")
    assert_refused(_infer, address, model, shown + 1, status="INVALID_ARGUMENT",
                   match=f"^inference request batch-size must be <= {shown} for '{model}'$")


def test_a_request_over_the_max_batch_size_is_refused_over_rest_v2_too(coordinators):
    _, url = coordinators
    assert _rest_infer(url, "digits", 64)[0] == 200
    assert _rest_infer(url, "digits", 65) == (400, {"error": "inference request batch-size must be <= 64 for 'digits'"})


def test_an_edge_runtime_called_directly_refuses_more_rows_than_its_config_shows(mesh):
    address = mesh.runtime("edge-b1")
    assert _shown(address, "digits") == 64  # CNEI_RUNTIME_BATCH_MAX_SIZE
    assert _infer(address, "digits", 64).as_numpy("probabilities").shape == (64, 10)
    assert_refused(_infer, address, "digits", 65, status="INVALID_ARGUMENT",
                   match="^inference request batch-size must be <= 64 for 'digits'$")
