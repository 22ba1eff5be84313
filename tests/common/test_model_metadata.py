"""Model metadata: each interpreted key's check, and readers taking a value stored before the
registry checked it as absent instead of failing the request."""
from __future__ import annotations

import logging
import re

import pytest

from services.common import model_metadata
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.model_spec import ModelVariant, TensorSpec
from services.coordinator.precision import PrecisionPolicy, accuracy, choose_variant, latency_ms
from services.coordinator.status import variant_latencies


def _variant(metadata: dict[str, str], precision: str = "FP32") -> ModelVariant:
    return ModelVariant(name="digits", version="1", precision=precision, sha256=precision, size_bytes=1,
                        inputs=[TensorSpec("input", "FP32", (-1, 64))],
                        outputs=[TensorSpec("probabilities", "FP32", (-1, 10))], metadata=metadata)


@pytest.mark.parametrize(
    ("key", "text", "parsed"),
    [("max_batch_size", "0", 0), ("max_batch_size", "2147483647", 2147483647), ("accuracy", "0.9733", 0.9733),
     ("accuracy", "1", 1.0), ("labels", '["cat", "dog"]', ["cat", "dog"]), ("labels", "[]", []),
     ("latency_ms.edge-arm", "0.5", 0.5), ("memory_bytes.cloud", "123", 123)],
)
def test_a_valid_value_of_an_interpreted_key_passes_the_check_and_reads_as_its_value(key, text, parsed):
    model_metadata.check({key: text})
    assert model_metadata.value({key: text}, key) == parsed


@pytest.mark.parametrize("key", ["note", "task", "latency_ms.", "accuracy_dataset", "eval_output"])
def test_a_key_no_service_parses_takes_any_text(key):
    model_metadata.check({key: "-1 NaN not json"})


@pytest.mark.parametrize(
    ("key", "text"),
    [("max_batch_size", "-1"), ("max_batch_size", "abc"), ("max_batch_size", " 8"), ("max_batch_size", "1_0"),
     ("accuracy", "NaN"), ("accuracy", "abc"), ("accuracy", "1.01"), ("labels", "cat"), ("labels", '[["a"]]'),
     ("latency_ms.edge", "inf"), ("memory_bytes.edge", "-1")],
)
def test_a_bad_value_is_refused_by_the_check_and_read_as_absent_with_a_warning(key, text, caplog):
    with pytest.raises(InvalidArgument, match=re.escape(f"metadata {key}={text!r} must")):
        model_metadata.check({key: text})
    with caplog.at_level(logging.WARNING):
        assert model_metadata.value({key: text}, key, "digits") is None
    assert any(f"{key}={text!r}" in r.getMessage() and "taken as absent" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("text", ["-1", "abc", "1.5", "99999999999"])
def test_a_stored_max_batch_size_that_does_not_read_is_the_default_one(text):
    """It answered every request INVALID_ARGUMENT (-1) or INTERNAL (abc) before."""
    assert _variant({"max_batch_size": text}).max_batch_size == 1024


@pytest.mark.parametrize("text", ["NaN", "abc", "inf", "97"])
def test_a_stored_accuracy_that_does_not_read_is_no_accuracy(text):
    assert accuracy(_variant({"accuracy": text})) is None


@pytest.mark.parametrize("text", ["NaN", "-1", "fast"])
def test_a_stored_latency_that_does_not_read_is_no_latency(text):
    variant = _variant({"latency_ms.edge": text, "latency_ms.cloud": "0.5"})
    assert latency_ms(variant, "edge") is None
    assert variant_latencies(variant) == {"cloud": 0.5}


def test_an_accuracy_floor_no_variant_has_a_readable_accuracy_for_says_none_is_measured():
    variants = [_variant({"accuracy": "NaN"}), _variant({"accuracy": "abc"}, "INT8"), _variant({}, "FP16")]
    with pytest.raises(FailedPrecondition, match=r"accuracy_floor 0\.9 \(no variant has a measured accuracy\)$"):
        choose_variant(variants, PrecisionPolicy(accuracy_floor=0.9), "edge")
