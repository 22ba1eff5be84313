"""An ensemble whose steps' models type a tensor differently (a real registry process): refused
when put, as Triton refuses to load it, and so is a deployment or its deletion that would have a
step run such a version."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from services.common.deployment import DeploymentSpec, EnsembleStep, RolloutSpec
from services.common.errors import CneiError, ErrorCode
from services.models.onnx_mlp import OPSET, mlp_graph


def cast_graph(name: str, width: int) -> onnx.ModelProto:
    """Input 'scores' INT64 [-1, width] -> output 'label' FP32 [-1, width]."""
    node = helper.make_node("Cast", ["scores"], ["label"], to=TensorProto.FLOAT)
    graph = helper.make_graph([node], name, [helper.make_tensor_value_info("scores", TensorProto.INT64, ["n", width])],
                              [helper.make_tensor_value_info("label", TensorProto.FLOAT, ["n", width])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    return model


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """'edge': input [-1, 4] -> probabilities FP32 [-1, 3]; 'head': scores FP32 [-1, 3] -> label;
    'wide': scores FP32 [-1, 5] -> label; 'int': scores INT64 [-1, 3] -> label."""
    root = tmp_path_factory.mktemp("artifacts")
    rng = np.random.default_rng(0)
    graphs = {"int": cast_graph("int", 3)}
    for key, (width, classes, inp, out) in {"edge": (4, 3, "input", "probabilities"),
                                            "head": (3, 2, "scores", "label"), "wide": (5, 2, "scores", "label")}.items():
        graphs[key] = mlp_graph([rng.standard_normal((width, classes)).astype(np.float32)],
                                [np.zeros(classes, np.float32)], name=key, input_name=inp, output_name=out)
    paths = {key: root / f"{key}.onnx" for key in graphs}
    for key, graph in graphs.items():
        onnx.save(graph, paths[key])
    return paths


def pipe(name: str, edge: str, head: str) -> DeploymentSpec:
    return DeploymentSpec(model=f"{name}-pipe", ensemble=(
        EnsembleStep(edge, inputs=("input=image",), outputs=("probabilities=p",)),
        EnsembleStep(head, inputs=("scores=p",), outputs=("label=answer",))))


async def refused(client, put, code: ErrorCode) -> str:
    with pytest.raises(CneiError) as info:
        await put
    assert info.value.code is code, info.value.message
    return info.value.message


@pytest.mark.parametrize(("head", "problem"), [
    ("int", "inconsistent datatype: FP32 is inferred from model '{edge}' version 1 (output 'probabilities') while "
            "INT64 is inferred from model '{head}' version 1 (input 'scores')"),
    ("wide", "inconsistent shape: [-1, 3] is inferred from model '{edge}' version 1 (output 'probabilities') while "
             "[-1, 5] is inferred from model '{head}' version 1 (input 'scores')"),
], ids=["datatype", "shape"])
async def test_an_ensemble_whose_second_step_reads_a_tensor_otherwise_than_the_first_writes_it_is_refused(
        client, models, name, head, problem):
    spec = pipe(name, models["edge"], models[head])
    message = await refused(client, client.put_deployment(spec), ErrorCode.INVALID_ARGUMENT)
    assert message == f"ensemble '{name}-pipe' tensor 'p': " + problem.format(edge=models["edge"], head=models[head])
    assert spec not in await client.list_deployments()


async def test_an_ensemble_whose_steps_agree_on_every_tensor_is_stored(client, models, name):
    spec = pipe(name, models["edge"], models["head"])
    assert await client.put_deployment(spec) == spec


@pytest.fixture
async def int_later(client, name, artifacts) -> str:
    """A model whose version 1 reads 'scores' as FP32, version 2 as INT64 (same names)."""
    for version, key in (("1", "head"), ("2", "int")):
        await client.push_file(artifacts[key], f"{name}-later", version, "FP32")
    return f"{name}-later"


INT64_LATER = "INT64 is inferred from model '{}' version 2 (input 'scores')"


@pytest.mark.parametrize("rollout", [RolloutSpec("2"), RolloutSpec("1", "2", 10.0)], ids=["pinned-stable", "canary"])
async def test_a_deployment_that_would_have_a_step_run_a_version_typing_a_tensor_otherwise_is_refused(
        client, models, int_later, name, rollout):
    pinned = DeploymentSpec(model=int_later, rollout=RolloutSpec("1"))
    await client.put_deployment(pinned)
    await client.put_deployment(pipe(name, models["edge"], int_later))
    message = await refused(client, client.put_deployment(dataclasses.replace(pinned, rollout=rollout)),
                            ErrorCode.FAILED_PRECONDITION)
    assert message.startswith(f"ensemble '{name}-pipe' tensor 'p': inconsistent datatype: FP32")
    assert INT64_LATER.format(int_later) in message
    assert await client.get_deployment(int_later) == pinned


async def test_deleting_a_deployment_that_kept_a_step_on_a_version_typing_its_tensors_alike_is_refused(
        client, models, int_later, name):
    pinned = DeploymentSpec(model=int_later, rollout=RolloutSpec("1"))
    await client.put_deployment(pinned)
    await client.put_deployment(pipe(name, models["edge"], int_later))
    message = await refused(client, client.delete_deployment(int_later), ErrorCode.FAILED_PRECONDITION)
    assert INT64_LATER.format(int_later) in message
    assert await client.get_deployment(int_later) == pinned


async def test_an_ensemble_whose_steps_model_has_a_canary_typing_a_tensor_otherwise_is_refused(
        client, models, int_later, name):
    await client.put_deployment(DeploymentSpec(model=int_later, rollout=RolloutSpec("1", "2", 10.0)))
    message = await refused(client, client.put_deployment(pipe(name, models["edge"], int_later)),
                            ErrorCode.FAILED_PRECONDITION)
    assert INT64_LATER.format(int_later) in message


@pytest.mark.parametrize("version", ["", "1"], ids=["unpinned", "naming-version-1"])
async def test_a_push_an_unpinned_step_runs_that_types_a_tensor_otherwise_is_logged_naming_the_tensor(
        client, registry, models, artifacts, name, version):
    """Version 2 reads 'scores' as INT64 under the same name: an unpinned step runs it (a push is
    not refused, and no step alone can judge it), so the registry's log says the ensemble's requests
    will fail; a step naming version 1 goes on running it."""
    later = f"{name}-later"
    await client.push_file(artifacts["head"], later, "1", "FP32")
    spec = pipe(name, models["edge"], later)
    await client.put_deployment(dataclasses.replace(spec, ensemble=(
        spec.ensemble[0], dataclasses.replace(spec.ensemble[1], version=version))))
    await client.push_file(artifacts["int"], later, "2", "FP32")
    said = registry.logged(f"ensemble '{name}-pipe' tensor 'p'")
    if version:
        assert said == []
        return
    assert len(said) == 1 and "WARNING" in said[0], said
    assert INT64_LATER.format(later) in said[0] and "its requests will fail" in said[0]
