"""A deployment that needs INT8 and pins no stable version, while a version's variants arrive one
push at a time (the whole mesh as real processes): a version pushed without INT8 is not served,
through the coordinator or a runtime's own client, until its INT8 variant is in."""
from __future__ import annotations

import asyncio

import numpy as np
import tritonclient.grpc as triton

from services.cli import infra
from services.common.deployment import DeploymentSpec, PrecisionSpec
from services.common.registry_client import RegistryClient
from tests.e2e.processes import put_deployment

MODEL = "digits-int8-latest"


def push(mesh, digits_models, version: str, precision: str) -> None:
    built = next(v for v in digits_models if v.precision == precision)

    async def push_it() -> None:
        client = RegistryClient(mesh.registry, timeout=30)
        try:
            await client.push_file(built.path, MODEL, version, precision, built.metadata)
        finally:
            await client.close()
    asyncio.run(push_it())


def served(address: str, version: str = "", **parameters: str) -> tuple[str, str]:
    """(version, precision) of the answer to a request naming `version` ("": none)."""
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
    client = triton.InferenceServerClient(address)
    try:
        reply = client.infer(MODEL, [tensor], model_version=version, client_timeout=30,
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
