"""The version a deployment serves to requests that name none: the pinned stable one, else the
newest version holding every precision the deployment needs."""
from __future__ import annotations

import pytest

from services.common.deployment import DeploymentSpec, EnsembleStep, JointSpec, PrecisionSpec, RolloutSpec
from services.common.errors import FailedPrecondition, ModelNotFound
from services.common.model_spec import ModelVariant
from services.common.served import (latest_version, models_in_use, needed_precisions, served_version,
                                    step_passed_over, step_precision_problem, step_stable_version, step_tensor_problem,
                                    step_version, step_versions, versions_in_use)
from services.common.model_spec import TensorSpec


def held(*keys: str) -> list[ModelVariant]:
    """Variants of model 'm' from 'version:precision' keys."""
    return [ModelVariant("m", *key.split(":"), "0", 1, [], []) for key in keys]


def spec(precision: str = "", edge: str = "", stable: str = "") -> DeploymentSpec:
    return DeploymentSpec(model="m", precision=PrecisionSpec(precision), joint=JointSpec(edge_precision=edge),
                          rollout=RolloutSpec(stable=stable))


@pytest.mark.parametrize(("deployed", "variants", "version"), [
    (spec(), held("1:FP32", "2:INT8", "10:FP32"), "10"),
    (spec("INT8"), held("1:FP32", "1:INT8", "2:FP32"), "1"),
    (spec("int8"), held("1:FP32", "1:INT8", "2:FP32", "2:INT8"), "2"),
    (spec(edge="INT8"), held("1:INT8", "2:FP32"), "1"),
    (spec("FP16", edge="INT8"), held("1:FP16", "1:INT8", "2:FP16", "3:INT8"), "1"),
    (spec("INT8", stable="2"), held("1:INT8", "2:FP32"), "2"),
], ids=["nothing-needed-the-newest", "a-version-without-the-precision-is-passed-over", "once-it-has-it-it-serves",
        "joint-edge-precision", "every-precision-needed", "a-pinned-stable-version-wins"])
def test_the_served_version_is_the_pinned_one_else_the_newest_with_every_precision_needed(deployed, variants, version):
    assert served_version(deployed, variants) == version


def test_the_needed_precisions_name_the_fields_asking_for_them():
    assert needed_precisions(spec("int8", edge="FP16")) == {"m.precision.precision": "INT8",
                                                            "m.joint.edge_precision": "FP16"}


def test_a_model_without_variants_is_not_found():
    with pytest.raises(ModelNotFound):
        latest_version(spec(), [])


def test_no_version_with_every_precision_needed_is_a_failed_precondition_naming_them():
    with pytest.raises(FailedPrecondition, match=r"no version of model 'm' .* INT8 \('m.precision.precision'\)"):
        served_version(spec("INT8"), held("1:FP32", "2:FP16"))


def int8_step(version: str = "", precision: str = "int8") -> EnsembleStep:
    return EnsembleStep(model="m", version=version, inputs=("x=x",), outputs=("y=y",), precision=precision)


@pytest.mark.parametrize(("step", "deployed", "variants", "version"), [
    (int8_step(), spec(), held("1:FP32", "1:INT8", "2:FP32"), "1"),
    (int8_step(), spec(), held("1:FP32", "1:INT8", "2:FP32", "2:INT8"), "2"),
    (int8_step(), spec("FP16"), held("1:FP16", "1:INT8", "2:FP16", "3:INT8", "3:FP16"), "3"),
    (int8_step(), spec("FP16"), held("1:FP16", "1:INT8", "2:FP16", "3:INT8"), "1"),
    (int8_step(precision=""), spec(), held("1:FP32", "1:INT8", "2:FP32"), "2"),
    (int8_step(), spec(stable="2"), held("1:FP32", "1:INT8", "2:FP32"), "2"),
    (int8_step("2"), spec(), held("1:FP32", "1:INT8", "2:FP32"), "2"),
], ids=["a-newer-version-without-it-is-passed-over", "once-it-has-it-it-runs", "the-deployments-precision-too",
        "a-version-without-the-deployments-precision-is-passed-over", "no-precision-the-served-version",
        "a-pinned-stable-version-as-pinned", "a-named-version"])
def test_an_ensemble_step_runs_the_newest_version_with_its_precision_and_the_deployments(
        step, deployed, variants, version):
    assert step_stable_version(step, deployed, variants) == version
    assert step_versions(step, deployed, variants) == [version]
    assert {step_version(step, deployed, variants, draw) for draw in (0.0, 0.5, 0.99)} == {version}


def test_an_ensemble_step_naming_no_version_sends_its_models_canary_its_share():
    deployed = DeploymentSpec("m", rollout=RolloutSpec("1", "3", 25.0))
    variants = held("1:INT8", "2:INT8", "3:INT8")
    assert [step_version(int8_step(), deployed, variants, draw) for draw in (0.0, 0.24, 0.25, 0.9)] == \
        ["3", "3", "1", "1"]
    assert step_versions(int8_step(), deployed, variants) == ["1", "3"]
    assert {step_version(int8_step("2"), deployed, variants, draw) for draw in (0.0, 0.9)} == {"2"}
    unpinned = DeploymentSpec("m", rollout=RolloutSpec("", "1", 25.0))
    assert step_versions(int8_step(), unpinned, held("1:INT8", "2:INT8", "3:FP32")) == ["2", "1"]


def test_no_version_with_the_steps_precision_and_the_deployments_is_a_failed_precondition_naming_them():
    asked = r"asked for: FP16 \('m.precision.precision'\), INT8 \(the step's precision\)"
    with pytest.raises(FailedPrecondition, match=f"no version of model 'm' has a variant in every precision {asked}"):
        step_stable_version(int8_step(), spec("FP16"), held("1:FP16", "2:INT8"))


@pytest.mark.parametrize(("step_version", "deployed", "problem"), [
    ("", spec(), None),
    ("", spec(stable="2"), "model 'm' version 2 has no INT8 variant, which the step's precision asks for (its "
                           "variants: FP32)"),
    ("", spec("FP16"), "no version of model 'm' has a variant in every precision asked for: FP16"),
    ("", spec(stable="1"), None),
    ("", spec("INT8"), None),
    ("", DeploymentSpec("m", rollout=RolloutSpec("1", "2", 5.0)), "model 'm' version 2 has no INT8 variant"),
    ("1", spec(), None),
    ("3", spec(), "model 'm' version 3 has no INT8 variant, which the step's precision asks for (its variants: none)"),
], ids=["the-latest-lacks-it-an-older-version-has-it", "pinned-stable-lacks-it",
        "no-version-has-it-and-the-deployments", "pinned-stable-has-it", "latest-with-it", "canary-lacks-it",
        "named-version-has-it", "named-version-absent"])
def test_an_ensemble_step_asking_for_a_precision_needs_it_in_every_version_its_requests_go_to(
        step_version, deployed, problem):
    found = step_precision_problem(int8_step(step_version), deployed, held("1:FP32", "1:INT8", "2:FP32"))
    assert found is None if problem is None else problem in found


@pytest.mark.parametrize(("specs", "used"), [
    ([], {}),
    ([spec()], {"2": "its deployment serves it as the latest version (pin another stable version first)"}),
    ([DeploymentSpec("m", rollout=RolloutSpec("1", "2", 5.0))],
     {"1": "its deployment pins it as the stable version", "2": "its deployment's canary"}),
    ([DeploymentSpec("e", ensemble=(EnsembleStep("m", "", ("x=x",), ("y=y",)),))], {"2": "ensemble 'e' step 0 runs it"}),
    ([spec(), DeploymentSpec("e", ensemble=(int8_step(),))],
     {"2": "its deployment serves it as the latest version (pin another stable version first)",
      "1": "ensemble 'e' step 0 runs it"}),
    ([DeploymentSpec("edge", joint=JointSpec(mode="sync", cloud_model="m", cloud_version="1"))],
     {"1": "the deployment of model 'edge' runs it as its joint cloud model"}),
    ([DeploymentSpec("edge", joint=JointSpec(cloud_model="other"))], {}),
], ids=["no-deployment", "unpinned", "pinned-and-canary", "ensemble-step", "int8-ensemble-step-over-an-fp32-latest",
        "joint-cloud-model", "another-cloud-model"])
def test_the_versions_in_use_are_those_requests_go_to(specs, used):
    assert versions_in_use("m", specs, held("1:FP32", "1:INT8", "2:FP32")) == used


@pytest.mark.parametrize(("specs", "models"), [
    ([], set()),
    ([spec()], {"m"}),
    ([DeploymentSpec("e", ensemble=(int8_step(), EnsembleStep("n", "", ("x=x",), ("y=y",))))], {"e", "m", "n"}),
    ([DeploymentSpec("edge", joint=JointSpec(mode="sync", cloud_model="m", cloud_version="1"))], {"edge", "m"}),
    ([DeploymentSpec("edge", joint=JointSpec(mode="sync"))], {"edge"}),
], ids=["none", "its-own", "ensemble-steps", "joint-cloud-model", "joint-over-itself"])
def test_the_models_in_use_are_those_deployments_send_requests_to_and_no_other_has_a_version_in_use(specs, models):
    assert models_in_use(specs) == models
    assert all(versions_in_use(model, specs, held("1:FP32", "1:INT8", "2:FP32")) == {}
               for model in {"m", "n", "edge", "other"} - models)


def tensors(key: str, inputs: str, outputs: str) -> ModelVariant:
    """A variant of model 'm' from a 'version:precision' key and its comma-separated tensor names."""
    specs = [[TensorSpec(n, "FP32", (-1, 4)) for n in names.split(",")] for names in (inputs, outputs)]
    return ModelVariant("m", *key.split(":"), "0", 1, *specs)


MAPPED = [tensors("1:FP32", "input", "probabilities"), tensors("1:INT8", "input", "probabilities")]


@pytest.mark.parametrize(("step_kw", "deployed", "renamed", "problem"), [
    ({}, spec(), tensors("2:FP32", "input", "probs"), None),
    ({}, spec(stable="1"), tensors("2:FP32", "x", "probabilities"), None),
    ({}, DeploymentSpec("m", rollout=RolloutSpec("1", "2", 10.0)), tensors("2:FP32", "x", "probabilities"),
     "model 'm' version 2 has no input 'input' (inputs: ['x'])"),
    ({"version": "2"}, spec(stable="1"), tensors("2:FP32", "input", "probs"),
     "model 'm' version 2 has no output 'probabilities' (outputs: ['probs'])"),
    ({"version": "1"}, DeploymentSpec("m", rollout=RolloutSpec("1", "2", 10.0)), tensors("2:FP32", "x", "probs"), None),
    ({}, spec(stable="1"), tensors("1:FP16", "input", "probs"),
     "model 'm' version 1 has no output 'probabilities' (outputs: ['probs'])"),
    ({"precision": "int8"}, spec(stable="1"), tensors("1:FP16", "input", "probs"), None),
    ({"precision": "int8"}, spec(), tensors("2:FP32", "input", "probs"), None),
], ids=["the-latest-renames-an-output-so-the-step-runs-the-one-before", "a-pin-keeps-the-version-that-has-them", "the-canary-renames-an-input",
        "the-named-version", "a-named-version-is-all-it-runs", "a-variant-of-the-version-renames-one",
        "the-steps-precision-is-all-it-runs-of-the-version", "a-version-without-the-steps-precision-is-not-run"])
def test_an_ensemble_step_needs_the_tensors_it_maps_in_every_version_and_variant_its_requests_go_to(
        step_kw, deployed, renamed, problem):
    step = EnsembleStep("m", inputs=("input=image",), outputs=("probabilities=p",), **step_kw)
    assert step_tensor_problem(step, deployed, [*MAPPED, renamed]) == problem


def test_a_step_whose_model_runs_no_version_has_no_tensor_problem_but_its_precisions():
    step = EnsembleStep("m", inputs=("input=image",), outputs=("probabilities=p",), precision="FP16")
    assert step_tensor_problem(step, spec(), MAPPED) is None


def step(**fields: str) -> EnsembleStep:
    return EnsembleStep("m", inputs=("input=image",), outputs=("probabilities=p",), **fields)


@pytest.mark.parametrize(("step_kw", "deployed", "later", "version"), [
    ({}, spec(), [tensors("2:FP32", "x", "probabilities")], "1"),
    ({}, spec(), [tensors("2:FP32", "input", "probs")], "1"),
    ({}, spec(), [tensors("2:FP32", "x", "probs"), tensors("3:FP32", "input", "probabilities")], "3"),
    ({}, spec(), [tensors("2:FP32", "input", "probabilities"), tensors("2:INT8", "x", "probabilities")], "1"),
    ({"precision": "int8"}, spec(), [tensors("2:INT8", "x", "probabilities")], "1"),
    ({"precision": "int8"}, spec(), [tensors("2:FP32", "x", "probabilities"),
                                     tensors("2:INT8", "input", "probabilities")], "2"),
    ({}, spec("INT8"), [tensors("2:FP32", "input", "probabilities"), tensors("2:INT8", "x", "probabilities")], "1"),
    ({"version": "2"}, spec(), [tensors("2:FP32", "x", "probabilities")], "2"),
    ({}, spec(stable="2"), [tensors("2:FP32", "x", "probabilities")], "2"),
], ids=["a-renamed-input", "a-renamed-output", "a-newer-one-that-fits-again", "any-variant-renaming-one",
        "the-steps-precision-renaming-one", "only-the-steps-precision-counts", "with-the-deployments-precision-too",
        "a-step-naming-a-version-runs-it", "a-pinned-stable-version-is-run-as-pinned"])
def test_an_unpinned_step_runs_the_newest_version_whose_tensors_fit_its_mapping(step_kw, deployed, later, version):
    variants = [*MAPPED, *later]
    assert step_stable_version(step(**step_kw), deployed, variants) == version
    assert step_versions(step(**step_kw), deployed, variants) == [version]
    assert {step_version(step(**step_kw), deployed, variants, draw) for draw in (0.0, 0.5, 0.99)} == {version}


def test_when_no_version_fits_its_mapping_a_step_runs_the_newest_with_its_precision_and_its_problem_is_named():
    variants = [tensors("1:FP32", "x", "probabilities"), tensors("2:FP32", "x", "probs")]
    assert step_stable_version(step(), spec(), variants) == "2"
    assert step_tensor_problem(step(), spec(), variants) == "model 'm' version 2 has no input 'input' (inputs: ['x'])"


def test_the_version_in_use_by_a_step_is_the_one_that_fits_its_mapping_not_its_models_latest():
    variants = [*MAPPED, tensors("2:FP32", "x", "probabilities")]
    specs = [spec(), DeploymentSpec("e", ensemble=(step(),))]
    assert versions_in_use("m", specs, variants) == {
        "2": "its deployment serves it as the latest version (pin another stable version first)",
        "1": "ensemble 'e' step 0 runs it"}


@pytest.mark.parametrize(("step_kw", "deployed", "later", "passed_over"), [
    ({}, spec(), [tensors("2:FP32", "x", "probabilities")],
     ("1", "model 'm' version 2 has no input 'input' (inputs: ['x'])")),
    ({"precision": "int8"}, spec(), [tensors("2:INT8", "input", "probs")],
     ("1", "model 'm' version 2 has no output 'probabilities' (outputs: ['probs'])")),
    ({}, spec(), [tensors("2:FP32", "input", "probabilities")], None),
    ({"precision": "int8"}, spec(), [tensors("2:FP32", "x", "probabilities")], None),
    ({}, spec(stable="1"), [tensors("2:FP32", "x", "probabilities")], None),
    ({"version": "1"}, spec(), [tensors("2:FP32", "x", "probabilities")], None),
], ids=["a-renamed-input", "a-renamed-output-in-the-steps-precision", "it-fits-and-runs",
        "it-lacks-the-steps-precision", "the-models-deployment-pins-a-version", "the-step-names-a-version"])
def test_a_version_a_step_passes_over_for_its_mapping_is_said_with_the_version_it_runs_and_the_tensor(
        step_kw, deployed, later, passed_over):
    assert step_passed_over(step(**step_kw), deployed, [*MAPPED, *later], "2") == passed_over


def test_an_older_version_pushed_late_is_not_said_to_be_passed_over():
    variants = [*MAPPED, tensors("2:FP32", "input", "probabilities"), tensors("0:FP32", "x", "probabilities")]
    assert step_passed_over(step(), spec(), variants, "0") is None
