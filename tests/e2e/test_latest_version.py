"""A deployment that needs INT8 and pins no stable version, while a version's variants arrive one
push at a time (the whole mesh as real processes): a version pushed without INT8 is not served,
through the coordinator or a runtime's own client, until its INT8 variant is in; nor run by an
ensemble step asking for INT8 of a model whose deployment does not need it."""
from __future__ import annotations

import asyncio

import numpy as np
import tritonclient.grpc as triton

from services.cli import infra
from services.common.deployment import DeploymentSpec, EnsembleStep, PrecisionSpec
from services.common.registry_client import RegistryClient
from tests.e2e.processes import put_deployment

MODEL = "digits-int8-latest"


def push(mesh, digits_models, version: str, precision: str, model: str = MODEL) -> None:
    built = next(v for v in digits_models if v.precision == precision)

    async def push_it() -> None:
        client = RegistryClient(mesh.registry, timeout=30)
        try:
            await client.push_file(built.path, model, version, precision, built.metadata)
        finally:
            await client.close()
    asyncio.run(push_it())


def served(address: str, version: str = "", model: str = MODEL, **parameters: str) -> tuple[str, str]:
    """(version, precision) of the answer to a request for `model` naming `version` ("": none)."""
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
    client = triton.InferenceServerClient(address)
    try:
        reply = client.infer(model, [tensor], model_version=version, client_timeout=30,
                             parameters=parameters or None).get_response()
    finally:
        client.close()
    precision = reply.parameters["cnei_precision"].string_param if "cnei_precision" in reply.parameters else ""
    return reply.model_version, precision


def test_a_version_pushed_without_the_deployments_precision_is_served_once_it_has_it(mesh, digits_models):
    edge = mesh.runtime("edge-a1")
    for precision in ("FP32", "INT8"):
        push(mesh, digits_models, "1", precision)
    put_deployment(mesh, DeploymentSpec(model=MODEL, precision=PrecisionSpec("INT8")))
    assert served(mesh.coordinator) == ("1", "INT8")

    push(mesh, digits_models, "2", "FP32")
    infra.wait_until(lambda: served(mesh.coordinator, "2", precision="FP32")[0] == "2", 10, "the coordinator knowing version 2")
    assert {served(mesh.coordinator) for _ in range(10)} == {("1", "INT8")}
    assert served(edge)[0] == "1"  # a runtime's own client: the version the deployment serves

    push(mesh, digits_models, "2", "INT8")
    infra.wait_until(lambda: served(mesh.coordinator) == ("2", "INT8"), 10, "version 2 served once it has INT8")
    infra.wait_until(lambda: served(edge)[0] == "2", 10, "the runtime serving version 2")


STEP_MODEL = "digits-int8-step"
PIPE = "digits-int8-step-pipe"


def step_successes(address: str, version: str) -> int:
    """The coordinator's count of requests version `version` of STEP_MODEL answered."""
    client = triton.InferenceServerClient(address)
    try:
        stats = client.get_inference_statistics(STEP_MODEL, version).model_stats
    finally:
        client.close()
    return sum(s.inference_stats.success.count for s in stats if s.version == version)


def pipe_runs(address: str) -> str:
    """The precision the ensemble's one step ran at (the request must succeed)."""
    tensor = triton.InferInput("image", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
    client = triton.InferenceServerClient(address)
    try:
        reply = client.infer(PIPE, [tensor], client_timeout=30).get_response()
    finally:
        client.close()
    return reply.parameters["cnei_ensemble"].string_param.rsplit("/", 1)[1]


def test_an_ensemble_step_asking_for_int8_keeps_its_version_until_a_newer_one_has_int8(mesh, digits_models):
    """The step's model is deployed unpinned and needs no INT8: its version 2 pushed FP32 alone is
    what its own requests get, while the step goes on running version 1, the newest with INT8."""
    for precision in ("FP32", "INT8"):
        push(mesh, digits_models, "1", precision, STEP_MODEL)
    put_deployment(mesh, DeploymentSpec(model=STEP_MODEL))
    put_deployment(mesh, DeploymentSpec(model=PIPE, ensemble=(
        EnsembleStep(model=STEP_MODEL, inputs=("input=image",), outputs=("probabilities=p",), precision="INT8"),)))
    assert pipe_runs(mesh.coordinator) == "INT8"

    push(mesh, digits_models, "2", "FP32", STEP_MODEL)
    infra.wait_until(lambda: served(mesh.coordinator, model=STEP_MODEL)[0] == "2", 10,
                     "the step's model serving its version 2")
    before = step_successes(mesh.coordinator, "1"), step_successes(mesh.coordinator, "2")
    assert [pipe_runs(mesh.coordinator) for _ in range(5)] == ["INT8"] * 5
    assert (step_successes(mesh.coordinator, "1"), step_successes(mesh.coordinator, "2")) == \
        (before[0] + 5, before[1])

    push(mesh, digits_models, "2", "INT8", STEP_MODEL)

    def follows_version_2() -> bool:
        was = step_successes(mesh.coordinator, "2")
        return pipe_runs(mesh.coordinator) == "INT8" and step_successes(mesh.coordinator, "2") == was + 1
    infra.wait_until(follows_version_2, 10, "the step running version 2 once it has INT8")
