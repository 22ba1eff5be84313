"""A canary of a model's newest version over no pinned stable version: the registry refuses the
rollout (the stable version would be the canary itself), and `cnei deploy canary` pins the newest
other version as the stable one, which rollback comes back to. A version served without the
precision the deployment asks for is refused; an unpinned one is served by the latest version
that has it. A real registry process; the CLI run as a user runs
it."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from services.cli import clients, deploy
from services.cli import main as cli
from services.common.deployment import DeploymentSpec, JointSpec, PrecisionSpec, RolloutSpec
from services.common.errors import CneiError, ErrorCode
from services.common.registry_client import RegistryClient


@pytest.fixture
async def three_versions(client, name, built):
    for version in ("1", "2", "3"):
        await client.push_file(built["FP32"].path, name, version, "FP32")
    return name


def _cnei(registry, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli.main", "deploy", *args, "--registry", registry.target],
                          capture_output=True, text=True, timeout=60)


async def test_a_canary_of_the_latest_version_over_an_unpinned_stable_one_is_refused(client, three_versions):
    with pytest.raises(CneiError, match="canary version 3 is the latest version of model .* pin the stable") as info:
        await client.put_deployment(DeploymentSpec(model=three_versions, rollout=RolloutSpec(canary="3",
                                                                                             canary_percent=10)))
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert all(s.model != three_versions for s in await client.list_deployments())


@pytest.mark.parametrize("rollout", [RolloutSpec(stable="2", canary="3", canary_percent=10),
                                     RolloutSpec(canary="2", canary_percent=10)],
                         ids=["latest-canary-over-a-pinned-stable", "older-canary-over-the-latest"])
async def test_a_canary_beside_another_stable_version_is_stored(client, three_versions, rollout):
    spec = DeploymentSpec(model=three_versions, rollout=rollout)
    assert await client.put_deployment(spec) == spec


async def test_cnei_deploy_canary_pins_the_newest_other_version_and_rollback_returns_to_it(
        client, registry, three_versions):
    out = _cnei(registry, "canary", three_versions, "3", "--percent", "10")
    assert out.returncode == 0 and "stable v2, canary v3 at 10 %" in out.stdout, out.stderr
    assert (await client.get_deployment(three_versions)).rollout == RolloutSpec("2", "3", 10.0)
    out = _cnei(registry, "rollback", three_versions)
    assert out.returncode == 0 and "stable v2, no canary" in out.stdout, out.stderr
    assert (await client.get_deployment(three_versions)).rollout == RolloutSpec("2", "", 0.0)


async def test_cnei_deploy_canary_keeps_a_pinned_stable_version(client, registry, three_versions):
    await client.put_deployment(DeploymentSpec(model=three_versions, rollout=RolloutSpec(stable="1")))
    out = _cnei(registry, "canary", three_versions, "3", "--percent", "25")
    assert out.returncode == 0, out.stderr
    assert (await client.get_deployment(three_versions)).rollout == RolloutSpec("1", "3", 25.0)


async def test_cnei_deploy_canary_of_a_model_s_only_version_says_there_is_no_other(client, registry, name, built):
    await client.push_file(built["FP32"].path, name, "1", "FP32")
    out = _cnei(registry, "canary", name, "1")
    assert out.returncode != 0 and "only version" in out.stderr, (out.stdout, out.stderr)
    assert all(s.model != name for s in await client.list_deployments())


@pytest.fixture
async def int8_then_fp32(client, name, built):
    """Version 1 as FP32 and INT8, version 2 as FP32 alone."""
    for version, precisions in (("1", ("FP32", "INT8")), ("2", ("FP32",))):
        for precision in precisions:
            await client.push_file(built[precision].path, name, version, precision)
    return name


@pytest.mark.parametrize(("precision", "joint", "rollout", "refusal"), [
    ("INT8", JointSpec(), RolloutSpec("1", "2", 10.0),
     "version 2 (canary) has no INT8 variant, which deployment field '{name}.precision.precision' asks for "
     "(its variants: FP32)"),
    ("int8", JointSpec(), RolloutSpec("2"), "version 2 (stable) has no INT8 variant"),
    ("", JointSpec(mode="sync", edge_precision="FP16"), RolloutSpec(),
     "no version of model '{name}' has a variant in every precision its deployment asks for: "
     "FP16 ('{name}.joint.edge_precision')"),
], ids=["canary", "pinned-stable", "no-version-to-serve-at-the-edge"])
async def test_a_served_version_without_the_precision_the_deployment_asks_for_is_refused_naming_both(
        client, int8_then_fp32, precision, joint, rollout, refusal):
    spec = DeploymentSpec(model=int8_then_fp32, precision=PrecisionSpec(precision), joint=joint, rollout=rollout)
    with pytest.raises(CneiError) as info:
        await client.put_deployment(spec)
    assert info.value.code is ErrorCode.FAILED_PRECONDITION
    assert refusal.format(name=int8_then_fp32) in info.value.message
    assert all(s.model != int8_then_fp32 for s in await client.list_deployments())


@pytest.mark.parametrize(("precision", "joint"), [("INT8", JointSpec()), ("", JointSpec(mode="sync", edge_precision="INT8"))],
                         ids=["precision-policy", "joint-edge-precision"])
async def test_an_unpinned_deployment_is_stored_when_an_older_version_has_its_precision(
        client, int8_then_fp32, precision, joint):
    spec = DeploymentSpec(model=int8_then_fp32, precision=PrecisionSpec(precision), joint=joint)
    assert await client.put_deployment(spec) == spec  # served by version 1, the latest with INT8


async def test_a_canary_of_the_latest_version_with_the_deployments_precision_over_an_unpinned_stable_one_is_refused(
        client, int8_then_fp32):
    spec = DeploymentSpec(model=int8_then_fp32, precision=PrecisionSpec("INT8"),
                          rollout=RolloutSpec(canary="1", canary_percent=10))
    with pytest.raises(CneiError, match="canary version 1 is the latest version of model") as info:
        await client.put_deployment(spec)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT


async def test_a_pinned_stable_version_with_the_precision_serves_though_the_latest_lacks_it(client, int8_then_fp32):
    spec = DeploymentSpec(model=int8_then_fp32, precision=PrecisionSpec("INT8"), rollout=RolloutSpec("1"))
    assert await client.put_deployment(spec) == spec


async def test_cnei_deploy_canary_of_a_version_without_the_deployments_precision_is_refused(
        client, registry, int8_then_fp32):
    applied = DeploymentSpec(model=int8_then_fp32, precision=PrecisionSpec("INT8"), rollout=RolloutSpec("1"))
    await client.put_deployment(applied)
    out = _cnei(registry, "canary", int8_then_fp32, "2", "--percent", "10")
    assert out.returncode != 0 and "version 2 (canary) has no INT8 variant" in out.stderr, (out.stdout, out.stderr)
    assert await client.get_deployment(int8_then_fp32) == applied


async def test_cnei_deploy_canary_keeps_a_deployment_applied_between_its_read_and_its_put(
        client, registry, three_versions, monkeypatch):
    applied, raced = DeploymentSpec(model=three_versions, cloud_fallback=False, tiers=("edge",)), []

    class Racing(RegistryClient):
        """`cnei deploy apply` runs while the command first lists the model's versions."""

        async def list(self, name: str = ""):
            if not raced:
                raced.append(await client.put_deployment(applied))
            return await super().list(name)

    monkeypatch.setattr(clients, "registry", lambda args: Racing(args.registry))
    args = cli.parser().parse_args(["deploy", "canary", three_versions, "3", "--percent", "10",
                                    "--registry", registry.target])
    assert await deploy.deploy_rollout(args) == 0
    assert await client.get_deployment(three_versions) == dataclasses.replace(applied,
                                                                              rollout=RolloutSpec("2", "3", 10.0))
