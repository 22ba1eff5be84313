"""Deleting a deployment (`DeleteDeployment`, `cnei deploy delete`): the deployment deleted is
answered and announced, the model is served with the defaults afterwards (what the deployment
pinned may then be deleted), an ensemble another ensemble runs as a step is kept (an ensemble step
over its model goes on running the newest version with the tensors it maps), a deployment put since
the caller read it is kept, and a model without one is NOT_FOUND. A real registry
process."""
from __future__ import annotations

import subprocess
import sys
import uuid

import nats
import numpy as np
import onnx
import pytest

from services.common import deployment, events
from services.common.deployment import BatchingSpec, DeploymentSpec, EnsembleStep, JointSpec, RolloutSpec
from services.common.errors import CneiError, ErrorCode
from services.common.registry_client import NO_DEPLOYMENT
from services.models.onnx_mlp import mlp_graph
from tests.retrained import write_versions


@pytest.fixture
def files(tmp_path):
    return write_versions(tmp_path, seed=uuid.uuid4().int % 2**32)


@pytest.fixture
async def model(client, name, files) -> str:
    """A fresh model with versions 1 and 2 (FP32), deployed pinning version 1."""
    for version, path in zip("12", files):
        await client.push_file(path, name, version, "FP32")
    await client.put_deployment(DeploymentSpec(name, batching=BatchingSpec(max_batch_size=8), rollout=RolloutSpec("1")))
    return name


def ensemble(name: str, over: str, reads: str = "input=x", writes: str = "probabilities=y") -> DeploymentSpec:
    return DeploymentSpec(name, ensemble=(EnsembleStep(over, inputs=(reads,), outputs=(writes,)),))


async def refused_with(client, code: ErrorCode, model: str, if_updated_at: float = 0.0) -> str:
    with pytest.raises(CneiError) as info:
        await client.delete_deployment(model, if_updated_at)
    assert info.value.code is code, info.value.message
    return info.value.message


async def test_a_deleted_deployment_is_answered_and_its_model_is_served_with_the_defaults(client, model):
    spec, _ = await client.read_deployment(model)
    deleted = await client.delete_deployment(model)
    assert deployment.from_json(deleted) == spec
    assert all(s.model != model for s in await client.list_deployments())
    with pytest.raises(CneiError) as info:
        await client.get_deployment(model)
    assert info.value.code is ErrorCode.NOT_FOUND


async def test_the_versions_a_deleted_deployment_served_can_then_be_deleted_the_last_one_too(client, model):
    with pytest.raises(CneiError) as info:
        await client.delete(model, "1")
    assert info.value.code is ErrorCode.FAILED_PRECONDITION
    await client.delete_deployment(model)
    for version in ("1", "2"):
        assert [v.version for v in (await client.delete(model, version))[0]] == [version]
    assert await client.list(model) == []


@pytest.mark.parametrize("which", ["a model without one", "no such model", "no name"])
async def test_deleting_a_deployment_that_is_not_there_is_not_found(client, model, which):
    target = {"a model without one": model, "no such model": f"{model}-none", "no name": ""}[which]
    if target == model:
        await client.delete_deployment(model)
    assert "no deployment for model" in await refused_with(client, ErrorCode.NOT_FOUND, target)


async def test_a_deployment_deleted_as_read_goes_and_one_put_since_stays(client, model):
    _, read_at = await client.read_deployment(model)
    await client.put_deployment(DeploymentSpec(model, rollout=RolloutSpec("2")))
    message = await refused_with(client, ErrorCode.FAILED_PRECONDITION, model, read_at)
    assert f"the deployment of model '{model}' changed since it was read" in message
    assert (await client.get_deployment(model)).rollout.stable == "2"
    assert "changed since it was read" in await refused_with(client, ErrorCode.FAILED_PRECONDITION, model,
                                                             NO_DEPLOYMENT)
    _, read_again = await client.read_deployment(model)
    assert deployment.from_json(await client.delete_deployment(model, read_again)).rollout.stable == "2"


async def test_an_ensemble_another_ensemble_runs_as_a_step_is_kept_until_that_one_goes(client, model):
    inner, outer = f"{model}-inner", f"{model}-outer"
    await client.put_deployment(ensemble(inner, model))
    await client.put_deployment(ensemble(outer, inner, "x=x", "y=y"))
    message = await refused_with(client, ErrorCode.FAILED_PRECONDITION, inner)
    assert f"ensemble '{inner}' is run by ensemble '{outer}' step 0" in message
    assert (await client.get_deployment(inner)).ensemble
    assert deployment.from_json(await client.delete_deployment(outer)).model == outer
    assert deployment.from_json(await client.delete_deployment(inner)).model == inner


@pytest.mark.parametrize("user", ["an ensemble step", "a joint deployment"])
async def test_a_models_deployment_goes_while_others_run_the_model_itself(client, model, files, user):
    other = f"{model}-user"
    if user == "an ensemble step":
        await client.put_deployment(ensemble(other, model))
    else:
        await client.push_file(files[0], other, "1", "FP32")
        await client.put_deployment(DeploymentSpec(other, joint=JointSpec(mode="sync", cloud_model=model)))
    await client.delete_deployment(model)
    assert [s.model for s in await client.list_deployments() if s.model in (model, other)] == [other]


async def test_a_deployment_whose_deletion_leaves_an_ensemble_step_on_the_newest_version_fitting_its_mapping_goes(
        client, name, tmp_path):
    """Version 1 has output 'probabilities', version 2 'probs': deleted, the pin to 1 leaves the
    step running 1 still, the newest version with the tensors it maps (2 is passed over), so
    version 1 stays in use by the step."""
    files = {}
    for version, output in (("1", "probabilities"), ("2", "probs")):
        files[version] = tmp_path / f"v{version}.onnx"
        weights = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
        onnx.save(mlp_graph([weights], [np.zeros(3, np.float32)], name=output, output_name=output), files[version])
        await client.push_file(files[version], name, version, "FP32")
    await client.put_deployment(DeploymentSpec(name, rollout=RolloutSpec("1")))
    await client.put_deployment(ensemble(f"{name}-pipe", name, "input=x"))
    await client.delete_deployment(name)
    with pytest.raises(CneiError) as info:
        await client.delete(name, "1")
    assert info.value.code is ErrorCode.FAILED_PRECONDITION
    assert f"model '{name}' version 1 is in use: ensemble '{name}-pipe' step 0 runs it" in info.value.message


async def test_a_deleted_deployment_is_announced_as_updated_and_deleted(nats_server, client, model):
    nc = await nats.connect(nats_server, connect_timeout=5)
    try:
        sub = await nc.subscribe(events.DEPLOYMENT_UPDATED)
        await nc.flush(timeout=5)
        await client.delete_deployment(model)
        envelope = events.decode((await sub.next_msg(timeout=5)).data)
    finally:
        await nc.close()
    assert (envelope.type, envelope.source, envelope.payload) == (
        events.DEPLOYMENT_UPDATED, "registry", {"model": model, "deleted": True})


def cnei(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args], capture_output=True, text=True,
                          timeout=60)


def test_cnei_deploy_delete_says_what_it_deleted_and_refuses_in_one_line(registry, client, model):
    out = cnei("deploy", "delete", model, "--registry", registry.target)
    assert out.returncode == 0, out.stderr
    assert f"deployment of model '{model}' deleted: it is served with the default settings now" in out.stdout
    assert '"stable": "1"' in out.stdout
    again = cnei("deploy", "delete", model, "--registry", registry.target)
    assert again.returncode == 2 and again.stdout == ""
    assert again.stderr == f"error (NOT_FOUND): no deployment for model '{model}'\n"
