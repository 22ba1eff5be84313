"""An ensemble's tensors as its steps' models type them: every step reading or writing one must
see the same datatype and, past the batch dimension, a fitting shape (Triton's check of an
ensemble it loads)."""
from __future__ import annotations

import pytest

from services.common.deployment import DeploymentSpec, EnsembleStep
from services.common.ensemble_tensors import StepTensors, inconsistency_over, tensor_inconsistency
from services.common.model_spec import ModelVariant, TensorSpec

PIPE = DeploymentSpec(model="pipe", ensemble=(
    EnsembleStep("a", inputs=("input=image",), outputs=("probabilities=p",)),
    EnsembleStep("b", inputs=("scores=p",), outputs=("label=l",)),
    EnsembleStep("c", inputs=("x=p", "picture=image"), outputs=("y=out",)),
))


def run(model: str, version: str = "1", inputs: dict | None = None, outputs: dict | None = None) -> StepTensors:
    """What a step's model says of its tensors: {name: (datatype, shape)} per side."""
    return StepTensors(model, version, tuple(TensorSpec(n, *t) for n, t in (inputs or {}).items()),
                       tuple(TensorSpec(n, *t) for n, t in (outputs or {}).items()))


FP32_3 = ("FP32", (-1, 3))
A = run("a", inputs={"input": ("FP32", (-1, 4))}, outputs={"probabilities": FP32_3})
B = run("b", "2", inputs={"scores": FP32_3}, outputs={"label": ("INT64", (-1, 1))})
C = run("c", inputs={"x": FP32_3, "picture": ("FP32", (-1, 4))}, outputs={"y": FP32_3})


def with_input(step: StepTensors, name: str, datatype: str, shape: tuple[int, ...]) -> StepTensors:
    return StepTensors(step.model, step.version, tuple(t for t in step.inputs if t.name != name)
                       + (TensorSpec(name, datatype, shape),), step.outputs)


def test_steps_that_agree_on_every_tensor_have_no_inconsistency():
    assert tensor_inconsistency(PIPE, [A, B, C]) is None


@pytest.mark.parametrize(("b_reads", "problem"), [
    (("INT64", (-1, 3)), "inconsistent datatype: FP32 is inferred from model 'a' version 1 (output 'probabilities') "
                         "while INT64 is inferred from model 'b' version 2 (input 'scores')"),
    (("FP32", (-1, 5)), "inconsistent shape: [-1, 3] is inferred from model 'a' version 1 (output 'probabilities') "
                        "while [-1, 5] is inferred from model 'b' version 2 (input 'scores')"),
    (("FP32", (-1, 3, 1)), "inconsistent shape: [-1, 3] is inferred from model 'a' version 1 (output "
                           "'probabilities') while [-1, 3, 1] is inferred from model 'b' version 2 (input 'scores')"),
], ids=["datatype", "shape", "rank"])
def test_a_step_reading_a_tensor_otherwise_than_its_writer_writes_it_is_named_with_both_models(b_reads, problem):
    b = with_input(B, "scores", *b_reads)
    assert tensor_inconsistency(PIPE, [A, b, C]) == f"ensemble 'pipe' tensor 'p': {problem}"


@pytest.mark.parametrize("shape", [(-1, -1), (8, 3), (1, 3), (-1, 3)],
                         ids=["wildcard", "other-batch-size", "batch-of-one", "same"])
def test_a_wildcard_dimension_or_another_batch_dimension_is_no_inconsistency(shape):
    assert tensor_inconsistency(PIPE, [A, with_input(B, "scores", "FP32", shape), C]) is None


def test_the_first_dimension_of_models_that_do_not_batch_is_judged_as_any_other():
    """A model that does not batch (a fixed first dimension) names a real size there: a step
    writing 2 rows and one reading 5 disagree, as Triton says of them."""
    a = run("a", inputs={"input": ("FP32", (2, 4))}, outputs={"probabilities": ("FP32", (2, 3))})
    b = with_input(B, "scores", "FP32", (5, 3))
    assert tensor_inconsistency(PIPE, [a, b, None]) == (
        "ensemble 'pipe' tensor 'p': inconsistent shape: [2, 3] is inferred from model 'a' version 1 (output "
        "'probabilities') while [5, 3] is inferred from model 'b' version 2 (input 'scores')")


def test_a_tensor_read_by_two_steps_is_judged_for_each_against_its_writer():
    c = with_input(C, "x", "FP16", (-1, 3))
    assert tensor_inconsistency(PIPE, [A, B, c]) == (
        "ensemble 'pipe' tensor 'p': inconsistent datatype: FP32 is inferred from model 'a' version 1 (output "
        "'probabilities') while FP16 is inferred from model 'c' version 1 (input 'x')")


@pytest.mark.parametrize(("picture", "problem"), [
    (("INT64", (-1, 4)), "inconsistent datatype: FP32 is inferred from model 'a' version 1 (input 'input') while "
                         "INT64 is inferred from model 'c' version 1 (input 'picture')"),
    (("FP32", (-1, 2, 2)), "inconsistent shape: [-1, 4] is inferred from model 'a' version 1 (input 'input') while "
                           "[-1, 2, 2] is inferred from model 'c' version 1 (input 'picture')"),
], ids=["datatype", "shape"])
def test_an_ensemble_input_two_steps_read_differently_is_named_with_both_models(picture, problem):
    c = with_input(C, "picture", *picture)
    assert tensor_inconsistency(PIPE, [A, B, c]) == f"ensemble 'pipe' tensor 'image': {problem}"


def test_a_step_whose_tensors_are_not_known_is_not_judged():
    """A nested ensemble's step, or a tensor the model lacks (the name check's to refuse)."""
    assert tensor_inconsistency(PIPE, [A, None, with_input(C, "x", "INT8", (-1, 3))]) is not None
    assert tensor_inconsistency(PIPE, [A, None, C]) is None
    assert tensor_inconsistency(PIPE, [A, run("b", inputs={"other": ("INT8", ())}), C]) is None


def test_the_versions_each_step_may_run_are_judged_in_every_combination():
    canary = with_input(B, "scores", "INT64", (-1, 3))
    assert inconsistency_over(PIPE, [[A], [B], [C]]) is None
    assert "model 'b' version 2 (input 'scores')" in inconsistency_over(PIPE, [[A], [B, canary], [C]])


def test_step_tensors_of_a_variant_keep_its_model_version_and_tensors():
    variant = ModelVariant("a", "3", "FP32", "", 0, [TensorSpec("input", "FP32", (-1, 4))],
                           [TensorSpec("probabilities", "FP32", (-1, 3))])
    assert StepTensors.of(variant) == StepTensors("a", "3", (TensorSpec("input", "FP32", (-1, 4)),),
                                                  (TensorSpec("probabilities", "FP32", (-1, 3)),))
