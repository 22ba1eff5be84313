"""An ensemble step over an unpinned model, when a newer version of that model renames the input
the step reads (the whole mesh as real processes): the model's own requests get the new version,
the ensemble's requests go on succeeding on the older version whose tensors fit the step's
mapping, their answers and the ensemble's ModelConfig say so, and the registry's log says at the push which version was passed
over, for which tensor."""
from __future__ import annotations

import asyncio

import numpy as np
import onnx
import tritonclient.grpc as triton

from services.cli import infra
from services.common.deployment import DeploymentSpec, EnsembleStep
from services.common.registry_client import RegistryClient
from tests.e2e.processes import put_deployment

STEP_MODEL = "digits-fit-step"
PIPE = "digits-fit-pipe"


def push(mesh, path, version: str) -> None:
    async def push_it() -> None:
        client = RegistryClient(mesh.registry, timeout=30)
        try:
            await client.push_file(path, STEP_MODEL, version, "FP32")
        finally:
            await client.close()
    asyncio.run(push_it())


def renamed_input(source, target, name: str) -> None:
    """The ONNX model at `source` with its one input renamed `name`, saved at `target`."""
    model = onnx.load(str(source))
    old = model.graph.input[0].name
    model.graph.input[0].name = name
    for node in model.graph.node:
        node.input[:] = [name if tensor == old else tensor for tensor in node.input]
    onnx.save(model, str(target))


def infer(address: str, model: str, tensor_name: str) -> triton.InferResult:
    tensor = triton.InferInput(tensor_name, [1, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
    client = triton.InferenceServerClient(address)
    try:
        return client.infer(model, [tensor], client_timeout=30)
    finally:
        client.close()


def step_versions(address: str) -> str:
    """The versions the ensemble's steps ran, as its answer says (the request must succeed)."""
    return infer(address, PIPE, "image").get_response().parameters["cnei_ensemble_versions"].string_param


def test_a_step_keeps_the_version_fitting_its_mapping_when_a_newer_one_renames_its_input(
        mesh, digits_models, tmp_path):
    fp32 = next(v for v in digits_models if v.precision == "FP32")
    push(mesh, fp32.path, "1")
    put_deployment(mesh, DeploymentSpec(model=PIPE, ensemble=(
        EnsembleStep(model=STEP_MODEL, inputs=("input=image",), outputs=("probabilities=p",)),)))
    assert step_versions(mesh.coordinator) == f"{STEP_MODEL}:1"

    renamed_input(fp32.path, tmp_path / "pixels.onnx", "pixels")
    push(mesh, tmp_path / "pixels.onnx", "2")
    infra.wait_until(lambda: infer(mesh.coordinator, STEP_MODEL, "pixels").get_response().model_version == "2",
                     10, "the step's model serving its version 2")
    assert [step_versions(mesh.coordinator) for _ in range(5)] == [f"{STEP_MODEL}:1"] * 5
    client = triton.InferenceServerClient(mesh.coordinator)
    try:
        config = client.get_model_config(PIPE).config
    finally:
        client.close()
    assert config.parameters["step_versions"].string_value == f"{STEP_MODEL}:1"

    log = (mesh.mesh.logs / "registry.log").read_text()
    warning = next((line for line in log.splitlines() if f"ensemble '{PIPE}' step 0 ({STEP_MODEL})" in line), "")
    assert "WARNING" in warning.upper(), warning
    assert f"model '{STEP_MODEL}' version 2 has no input 'input' (inputs: ['pixels'])" in warning
    assert "runs version 1" in warning
