"""What a deployment is checked against when it is applied (a real registry process): a joint
cloud model that exists and can answer for the edge model, ensemble steps over models or other
ensembles whose tensors they map, asking for precisions the versions they run have, and no
ensemble that reaches itself."""
from __future__ import annotations

import asyncio
import dataclasses
import time

import numpy as np
import onnx
import pytest

from services.common import deployment
from services.common.deployment import BatchingSpec, DeploymentSpec, EnsembleStep, JointSpec, PrecisionSpec, RolloutSpec
from services.common.errors import CneiError, ErrorCode
from services.models.onnx_mlp import mlp_graph
from services.registry.store import RegistryStore


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Tiny ONNX models: input 'input' [-1, 4]; output 'probabilities' [-1, 3], 'probs' [-1, 3]
    or 'probabilities' [-1, 5]."""
    root = tmp_path_factory.mktemp("artifacts")
    paths = {}
    for key, output, classes in [("edge", "probabilities", 3), ("renamed", "probs", 3), ("wider", "probabilities", 5)]:
        weights = np.random.default_rng(0).standard_normal((4, classes)).astype(np.float32)
        paths[key] = root / f"{key}.onnx"
        onnx.save(mlp_graph([weights], [np.zeros(classes, np.float32)], name=key, output_name=output), paths[key])
    return paths


async def refused(client, spec: DeploymentSpec) -> str:
    """The INVALID_ARGUMENT message `spec` is refused with (and it was not stored)."""
    with pytest.raises(CneiError) as info:
        await client.put_deployment(spec)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT, info.value.message
    assert all(s != spec for s in await client.list_deployments())
    return info.value.message


def joint(model: str, **fields) -> DeploymentSpec:
    return DeploymentSpec(model=model, joint=JointSpec(mode="sync", **fields))


async def test_a_joint_cloud_model_that_does_not_exist_is_refused_naming_it(client, models):
    message = await refused(client, joint(models["edge"], cloud_model="no-such-cloud-model"))
    assert "joint.cloud_model" in message and "model 'no-such-cloud-model'" in message


@pytest.mark.parametrize(("cloud", "problem"),
                         [("renamed", "it has no output 'probabilities'"),
                          ("wider", "its output 'probabilities' has shape [-1, 5], the edge's [-1, 3]")])
async def test_a_joint_cloud_model_that_cannot_answer_for_the_edge_is_refused_naming_the_outputs(
        client, models, cloud, problem):
    message = await refused(client, joint(models["edge"], cloud_model=models[cloud]))
    assert f"joint cloud model '{models[cloud]}:1:FP32' cannot answer for model '{models['edge']}:1:FP32'" in message
    assert problem in message


async def test_a_joint_output_the_edge_model_lacks_is_refused(client, models):
    message = await refused(client, joint(models["edge"], output="logits"))
    assert "joint.output" in message and "no output 'logits'" in message


async def test_a_joint_cloud_model_with_the_edges_outputs_is_accepted(client, models):
    spec = joint(models["edge"], cloud_model=models["edge"], cloud_version="1", output="probabilities")
    assert await client.put_deployment(spec) == spec


def step(model: str, reads: str, writes: str) -> EnsembleStep:
    return EnsembleStep(model=model, inputs=(reads,), outputs=(writes,))


async def test_an_ensemble_may_nest_another_ensemble(client, models, name):
    inner = DeploymentSpec(model=f"{name}-inner", ensemble=(step(models["edge"], "input=image", "probabilities=p"),))
    outer = DeploymentSpec(model=f"{name}-outer", ensemble=(step(inner.model, "image=picture", "p=answer"),))
    await client.put_deployment(inner)
    assert await client.put_deployment(outer) == outer
    message = await refused(client, DeploymentSpec(model=f"{name}-bad", ensemble=(
        step(inner.model, "picture=x", "p=answer"),)))
    assert f"ensemble '{name}-bad' step 0 ({inner.model}): model '{inner.model}' has no input 'picture'" in message


async def test_an_ensemble_that_would_reach_itself_is_refused_naming_the_chain(client, models, name):
    a, b = f"{name}-a", f"{name}-b"
    await client.put_deployment(DeploymentSpec(model=a, ensemble=(step(models["edge"], "input=x", "probabilities=y"),)))
    await client.put_deployment(DeploymentSpec(model=b, ensemble=(step(a, "x=x", "y=y"),)))
    message = await refused(client, DeploymentSpec(model=a, ensemble=(step(b, "x=x", "y=y"),)))
    assert f"ensemble '{a}' reaches itself: {a} -> {b} -> {a}" in message


@pytest.mark.parametrize(("reads", "writes", "problem"),
                         [("inp=image", "probabilities=p", "has no input 'inp' (inputs: ['input'])"),
                          ("input=image", "probs=p", "has no output 'probs' (outputs: ['probabilities'])")],
                         ids=["input", "output"])
async def test_a_step_mapping_a_tensor_its_model_lacks_is_refused_naming_the_step_and_tensor(
        client, models, name, reads, writes, problem):
    spec = DeploymentSpec(model=f"{name}-pipe", ensemble=(step(models["edge"], reads, writes),))
    message = await refused(client, spec)
    assert f"ensemble '{name}-pipe' step 0 ({models['edge']}): model '{models['edge']}' {problem}" in message


async def test_a_push_under_an_ensembles_name_is_refused_naming_it_and_the_ensemble_can_be_applied_again(
        client, models, name, artifacts):
    pipe = DeploymentSpec(model=f"{name}-pipe", ensemble=(step(models["edge"], "input=image", "probabilities=p"),))
    await client.put_deployment(pipe)
    with pytest.raises(CneiError) as info:
        await client.push_file(artifacts["edge"], pipe.model, "1", "FP32")
    assert info.value.code is ErrorCode.FAILED_PRECONDITION
    assert f"'{pipe.model}' is the name of an ensemble deployment (steps: {models['edge']})" in info.value.message
    assert await client.list(pipe.model) == []
    assert await client.put_deployment(pipe) == pipe


@pytest.fixture
async def int8_then_fp32(client, name, artifacts) -> str:
    """A model whose version 1 is FP32 and INT8, version 2 FP32 alone."""
    for version, precision in (("1", "FP32"), ("1", "INT8"), ("2", "FP32")):
        await client.push_file(artifacts["edge"], f"{name}-steps", version, precision)
    return f"{name}-steps"


def int8_step(model: str, version: str = "") -> EnsembleStep:
    return EnsembleStep(model=model, version=version, inputs=("input=image",), outputs=("probabilities=p",),
                        precision="int8")


async def failed_precondition(client, spec: DeploymentSpec) -> str:
    """The FAILED_PRECONDITION message `spec` is refused with (and it was not stored)."""
    with pytest.raises(CneiError) as info:
        await client.put_deployment(spec)
    assert info.value.code is ErrorCode.FAILED_PRECONDITION, info.value.message
    assert all(s != spec for s in await client.list_deployments())
    return info.value.message


@pytest.mark.parametrize(("served", "version"), [(None, "2"), (DeploymentSpec("", rollout=RolloutSpec("2")), "")],
                         ids=["named", "pinned-stable"])
async def test_an_ensemble_step_asking_for_a_precision_its_version_lacks_is_refused_naming_step_model_and_precision(
        client, int8_then_fp32, name, served, version):
    if served is not None:
        await client.put_deployment(dataclasses.replace(served, model=int8_then_fp32))
    spec = DeploymentSpec(model=f"{name}-pipe", ensemble=(int8_step(int8_then_fp32, version),))
    message = await failed_precondition(client, spec)
    assert (f"ensemble '{name}-pipe' step 0 ({int8_then_fp32}): model '{int8_then_fp32}' version 2 has no INT8 "
            "variant, which the step's precision asks for (its variants: FP32)") in message


async def test_an_ensemble_step_asking_for_a_precision_no_version_has_with_the_deployments_is_refused_naming_both(
        client, int8_then_fp32, name):
    await client.put_deployment(DeploymentSpec(int8_then_fp32, precision=PrecisionSpec("FP32")))
    spec = DeploymentSpec(model=f"{name}-pipe", ensemble=(int8_step(int8_then_fp32),))
    assert await client.put_deployment(spec) == spec  # version 1 has both
    fp16 = DeploymentSpec(model=f"{name}-pipe", ensemble=(dataclasses.replace(int8_step(int8_then_fp32),
                                                                              precision="FP16"),))
    message = await failed_precondition(client, fp16)
    assert (f"ensemble '{name}-pipe' step 0 ({int8_then_fp32}): no version of model '{int8_then_fp32}' has a variant "
            f"in every precision asked for: FP32 ('{int8_then_fp32}.precision.precision'), FP16 (the step's "
            "precision)") in message


@pytest.mark.parametrize("served", [DeploymentSpec("", rollout=RolloutSpec("1")),
                                    DeploymentSpec("", precision=PrecisionSpec("INT8")), DeploymentSpec(""), None,
                                    "named"],
                         ids=["pinned-stable", "latest-with-int8", "unpinned-an-older-version-has-it",
                              "no-deployment-an-older-version-has-it", "named-version"])
async def test_an_ensemble_step_asking_for_a_precision_the_version_it_runs_has_is_stored(
        client, int8_then_fp32, name, served):
    if isinstance(served, DeploymentSpec):
        await client.put_deployment(dataclasses.replace(served, model=int8_then_fp32))
    spec = DeploymentSpec(model=f"{name}-pipe", ensemble=(int8_step(int8_then_fp32, "1" if served == "named" else ""),))
    assert await client.put_deployment(spec) == spec


async def test_a_deployment_that_would_serve_an_ensemble_step_a_version_without_its_precision_is_refused(
        client, int8_then_fp32, name):
    pinned = DeploymentSpec(model=int8_then_fp32, rollout=RolloutSpec("1"))
    await client.put_deployment(pinned)
    await client.put_deployment(DeploymentSpec(model=f"{name}-pipe", ensemble=(int8_step(int8_then_fp32),)))
    for rollout in (RolloutSpec("2"), RolloutSpec("1", "2", 10.0)):
        message = await failed_precondition(client, dataclasses.replace(pinned, rollout=rollout))
        assert (f"ensemble '{name}-pipe' step 0 ({int8_then_fp32}): model '{int8_then_fp32}' version 2 has no INT8 "
                "variant") in message
    assert await client.get_deployment(int8_then_fp32) == pinned
    unpinned = DeploymentSpec(model=int8_then_fp32)  # serves version 2; the step runs 1, the newest with INT8
    assert await client.put_deployment(unpinned) == unpinned


async def test_an_ensemble_step_asking_another_ensemble_for_a_precision_is_refused(client, models, name):
    inner = DeploymentSpec(model=f"{name}-inner", ensemble=(step(models["edge"], "input=image", "probabilities=p"),))
    await client.put_deployment(inner)
    outer = EnsembleStep(model=inner.model, inputs=("image=x",), outputs=("p=y",), precision="INT8")
    message = await refused(client, DeploymentSpec(model=f"{name}-outer", ensemble=(outer,)))
    assert f"ensemble '{name}-outer' step 0 ({inner.model}): asks for precision INT8" in message


async def test_a_queue_delay_no_attempt_could_wait_out_is_refused_but_one_stored_before_still_serves(
        client, registry, models):
    """The rule is for new puts: a deployment stored before it (by an older registry) still
    reads back, so its model goes on being served, and only putting it again is refused."""
    model = models["edge"]
    spec = DeploymentSpec(model=model, attempt_timeout_ms=40.0, batching=BatchingSpec(max_queue_delay_us=50_000))
    assert "must be below attempt_timeout_ms (40 ms)" in await refused(client, spec)
    RegistryStore(registry.data_dir).put_deployment(model, deployment.to_json(spec), time.time())  # an older registry's
    assert await client.get_deployment(model) == spec
    assert spec in await client.list_deployments()
    with pytest.raises(CneiError, match="must be below attempt_timeout_ms") as again:
        await client.put_deployment(spec)
    assert again.value.code is ErrorCode.INVALID_ARGUMENT


@pytest.fixture
async def renamed_later(client, name, artifacts) -> str:
    """A model whose version 1 has output 'probabilities', version 2 'probs' instead (FP32)."""
    for version, key in (("1", "edge"), ("2", "renamed")):
        await client.push_file(artifacts[key], f"{name}-steps", version, "FP32")
    return f"{name}-steps"


def mapping_step(model: str) -> EnsembleStep:
    return step(model, "input=image", "probabilities=p")


RENAMED = "version 2 has no output 'probabilities' (outputs: ['probs'])"


@pytest.mark.parametrize("rollout", [RolloutSpec("2"), RolloutSpec("1", "2", 10.0)], ids=["pinned-stable", "canary"])
async def test_a_deployment_that_would_serve_an_ensemble_step_a_version_without_a_tensor_it_maps_is_refused(
        client, renamed_later, name, rollout):
    pinned = DeploymentSpec(model=renamed_later, rollout=RolloutSpec("1"))
    await client.put_deployment(pinned)
    await client.put_deployment(DeploymentSpec(model=f"{name}-pipe", ensemble=(mapping_step(renamed_later),)))
    message = await failed_precondition(client, dataclasses.replace(pinned, rollout=rollout))
    assert f"ensemble '{name}-pipe' step 0 ({renamed_later}): model '{renamed_later}' {RENAMED}" in message
    assert await client.get_deployment(renamed_later) == pinned


async def test_an_ensemble_whose_steps_model_has_a_canary_without_a_tensor_it_maps_is_refused_and_stored_without(
        client, renamed_later, name):
    await client.put_deployment(DeploymentSpec(model=renamed_later, rollout=RolloutSpec("1", "2", 10.0)))
    spec = DeploymentSpec(model=f"{name}-pipe", ensemble=(mapping_step(renamed_later),))
    message = await failed_precondition(client, spec)
    assert f"ensemble '{name}-pipe' step 0 ({renamed_later}): model '{renamed_later}' {RENAMED}" in message
    await client.put_deployment(DeploymentSpec(model=renamed_later, rollout=RolloutSpec("1")))
    assert await client.put_deployment(spec) == spec


async def test_an_ensemble_step_over_a_model_whose_stored_deployment_no_version_serves_is_refused_naming_the_step(
        client, registry, models, name):
    """A deployment stored before its check (by an older registry) may ask for a precision no
    version has: a step over its model, asking for none, would run nothing."""
    model = models["edge"]
    int8 = DeploymentSpec(model=model, precision=PrecisionSpec("INT8"))
    RegistryStore(registry.data_dir).put_deployment(model, deployment.to_json(int8), time.time())  # an older registry's
    message = await failed_precondition(client, DeploymentSpec(model=f"{name}-pipe", ensemble=(mapping_step(model),)))
    assert message == (f"ensemble '{name}-pipe' step 0 ({model}): no version of model '{model}' has a variant in "
                       f"every precision its deployment asks for: INT8 ('{model}.precision.precision')")


@pytest.mark.parametrize("version", ["", "1"], ids=["unpinned", "naming-version-1"])
async def test_a_push_an_ensemble_step_passes_over_for_a_tensor_it_maps_is_logged_naming_the_step_and_tensor(
        client, registry, artifacts, name, version):
    """Version 2 renames output 'probabilities' 'probs': an unpinned step goes on running version 1,
    and the registry's log says so at the push; a step naming version 1 passes nothing over."""
    model, pipe = f"{name}-steps", f"{name}-pipe"
    await client.push_file(artifacts["edge"], model, "1", "FP32")
    await client.put_deployment(DeploymentSpec(model=pipe, ensemble=(
        dataclasses.replace(mapping_step(model), version=version),)))
    await client.push_file(artifacts["renamed"], model, "2", "FP32")
    said = registry.logged(f"ensemble '{pipe}' step 0 ({model})")
    if version:
        assert said == []
        return
    assert len(said) == 1 and "WARNING" in said[0], said
    assert f"runs version 1, passing over version 2: model '{model}' {RENAMED}" in said[0]


async def test_an_ensemble_put_whose_step_passes_the_newest_version_over_is_logged_naming_the_step_and_tensor(
        client, registry, artifacts, name):
    """Version 2 renames output 'probabilities' 'probs' before the ensemble is put: the step runs
    version 1, which the registry's log says when the ensemble is stored."""
    model, pipe = f"{name}-steps", f"{name}-pipe"
    await client.push_file(artifacts["edge"], model, "1", "FP32")
    await client.push_file(artifacts["renamed"], model, "2", "FP32")
    await client.put_deployment(DeploymentSpec(model=pipe, ensemble=(mapping_step(model),)))
    said = registry.logged(f"ensemble '{pipe}' step 0 ({model})")
    assert len(said) == 1 and "WARNING" in said[0], said
    assert f"runs version 1, passing over version 2: model '{model}' {RENAMED}" in said[0]


async def test_cnei_deploy_apply_of_an_ensemble_says_the_version_each_step_runs_and_warns_of_one_passed_over(
        registry, client, artifacts, name, tmp_path, capsys):
    """Version 2 renames output 'probabilities' 'probs': `cnei deploy apply` of an ensemble over
    the model says its step runs version 1, and warns (on stderr) of version 2 passed over."""
    from services.cli import main as cli

    model, pipe = f"{name}-steps", f"{name}-pipe"
    await client.push_file(artifacts["edge"], model, "1", "FP32")
    await client.push_file(artifacts["renamed"], model, "2", "FP32")
    spec_file = tmp_path / "pipe.json"
    spec_file.write_text(deployment.to_json(DeploymentSpec(model=pipe, ensemble=(mapping_step(model),))))
    assert await asyncio.to_thread(cli.main, ["deploy", "apply", str(spec_file), "--registry", registry.target]) == 0
    out, err = capsys.readouterr()
    assert f"steps: {model}:1\n" in out
    assert (f"warning: ensemble '{pipe}' step 0 ({model}) runs version 1, passing over version 2: "
            f"model '{model}' {RENAMED}") in err
