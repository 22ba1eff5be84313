"""Model variants: resolution rule, version order, input checks and batching capability."""
from __future__ import annotations

import numpy as np
import pytest

from services.common.errors import InvalidArgument, ModelNotFound, TensorError
from services.common.model_spec import ModelVariant, TensorSpec, check_inputs, pick_variant, version_key


def _variant(version: str, precision: str, inputs=None, metadata=None) -> ModelVariant:
    return ModelVariant(
        name="digits", version=version, precision=precision, sha256=f"{version}{precision}",
        size_bytes=1, inputs=inputs or [TensorSpec("input", "FP32", (-1, 64))],
        outputs=[TensorSpec("probabilities", "FP32", (-1, 10))], metadata=metadata or {},
    )


CATALOGUE = [_variant(v, p) for v, p in [
    ("1", "FP32"), ("1", "FP16"), ("1", "INT8"), ("2", "INT8"), ("2", "FP16"), ("9", "FP32"), ("10", "INT8"),
]]


@pytest.mark.parametrize(
    ("version", "precision", "expected"),
    [
        ("", "", ("10", "INT8")),
        ("", "FP32", ("9", "FP32")),
        ("", "fp16", ("2", "FP16")),
        ("1", "", ("1", "FP32")),
        ("2", "", ("2", "FP16")),
        ("1", "int8", ("1", "INT8")),
    ],
    ids=["latest-version-first", "latest-with-precision", "lower-case-precision",
         "fp32-default", "fp16-before-int8", "explicit-both"],
)
def test_pick_variant_takes_the_latest_version_then_fp32_fp16_int8(version, precision, expected):
    got = pick_variant(CATALOGUE, "digits", version, precision)
    assert (got.version, got.precision) == expected


@pytest.mark.parametrize(
    ("variants", "version", "precision", "message"),
    [
        ([], "", "", "model 'digits' not found"),
        (CATALOGUE, "3", "", "model 'digits' version 3 not found"),
        (CATALOGUE, "9", "INT8", "model 'digits' version 9 precision INT8 not found"),
    ],
)
def test_pick_variant_raises_model_not_found_naming_what_is_missing(variants, version, precision, message):
    with pytest.raises(ModelNotFound) as info:
        pick_variant(variants, "digits", version, precision)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("older", "newer"),
    [("9", "10"), ("1.9", "1.10"), ("1", "1.1"), ("2", "v1"), ("1-rc", "1-rc2")],
)
def test_versions_order_numerically_where_they_are_numbers(older, newer):
    assert version_key(older) < version_key(newer)


BATCHING = _variant("1", "FP32", metadata={"max_batch_size": "4"})
FIXED = _variant("1", "FP32", inputs=[TensorSpec("input", "FP32", (1, 64)), TensorSpec("mask", "BOOL", (1,))])
PAIR = _variant("1", "FP32", inputs=[TensorSpec("a", "FP32", (-1, 4)), TensorSpec("b", "FP32", (-1, 4))])


@pytest.mark.parametrize(
    ("variant", "inputs"),
    [
        (BATCHING, {"input": np.zeros((1, 64), np.float32)}),
        (BATCHING, {"input": np.zeros((4, 64), np.float32)}),
        (BATCHING, {"input": np.zeros((0, 64), np.float32)}),
        (FIXED, {"input": np.zeros((1, 64), np.float32), "mask": np.array([True])}),
    ],
    ids=["batch-of-one", "batch-at-limit", "empty-batch", "fixed-shapes"],
)
def test_check_inputs_accepts_inputs_that_match_the_model(variant, inputs):
    assert check_inputs(variant, inputs) is None


@pytest.mark.parametrize(
    ("variant", "inputs", "error", "message"),
    [
        (BATCHING, {"input": np.zeros((1, 64), np.float32), "extra": np.zeros(1)}, TensorError,
         r"tensor 'extra': is not an input of model 'digits' \(inputs: \['input'\]\)"),
        (FIXED, {"input": np.zeros((1, 64), np.float32)}, InvalidArgument,
         "model 'digits' needs input 'mask'"),
        (BATCHING, {"input": np.zeros((1, 64), np.float64)}, TensorError,
         "tensor 'input': datatype FP64 but model expects FP32"),
        (BATCHING, {"input": np.zeros(64, np.float32)}, TensorError,
         r"tensor 'input': shape \[64\] but model expects \[-1, 64\]"),
        (BATCHING, {"input": np.zeros((1, 63), np.float32)}, TensorError,
         r"tensor 'input': shape \[1, 63\] but model expects \[-1, 64\]"),
        (FIXED, {"input": np.zeros((2, 64), np.float32), "mask": np.array([True])}, TensorError,
         r"tensor 'input': shape \[2, 64\] but model expects \[1, 64\]"),
        (BATCHING, {"input": np.zeros((5, 64), np.float32)}, InvalidArgument,
         "inference request batch-size must be <= 4 for 'digits'"),
        # rows of one request: a batcher splitting a batch by the first input's rows would hand
        # this request's extra `b` rows to the next caller
        (PAIR, {"a": np.zeros((1, 4), np.float32), "b": np.zeros((2, 4), np.float32)}, InvalidArgument,
         "model 'digits' batches on the first dimension, but the inputs disagree on it: a 1, b 2"),
    ],
    ids=["unknown-input", "missing-input", "wrong-datatype", "wrong-rank", "wrong-dimension",
         "fixed-batch", "batch-too-large", "inputs-disagree-on-rows"],
)
def test_check_inputs_rejects_inputs_that_do_not_match_the_model(variant, inputs, error, message):
    with pytest.raises(error, match=message):
        check_inputs(variant, inputs)


@pytest.mark.parametrize(
    ("variant", "expected"),
    [(BATCHING, 4), (_variant("1", "FP32"), 1024), (FIXED, 0)],
    ids=["from-metadata", "default", "fixed-first-dimension"],
)
def test_a_model_batches_only_when_every_input_has_a_dynamic_first_dimension(variant, expected):
    assert variant.max_batch_size == expected
