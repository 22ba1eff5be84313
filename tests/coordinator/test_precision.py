"""Precision selection: which variant a request gets from its precision, accuracy and latency asks."""
from __future__ import annotations

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument, ModelNotFound
from services.common.model_spec import ModelVariant, TensorSpec
from services.coordinator.precision import PrecisionPolicy, choose_variant, policy_from_params

# accuracy, then batch-1 latency in ms on two node classes: INT8 is fastest at the edge, FP32 in the cloud
MEASURED = {
    "FP32": ("0.9700", {"edge-arm": "2.0", "cloud-gpu": "0.30"}),
    "FP16": ("0.9600", {"edge-arm": "1.2", "cloud-gpu": "0.50"}),
    "INT8": ("0.9300", {"edge-arm": "0.6", "cloud-gpu": "0.40"}),
}


def _variant(precision: str, metadata: dict[str, str]) -> ModelVariant:
    return ModelVariant(name="digits", version="1", precision=precision, sha256=precision, size_bytes=1,
                        inputs=[TensorSpec("input", "FP32", (-1, 64))],
                        outputs=[TensorSpec("probabilities", "FP32", (-1, 10))], metadata=metadata)


def _measured(precision: str) -> ModelVariant:
    accuracy, latencies = MEASURED[precision]
    return _variant(precision, {"accuracy": accuracy, **{f"latency_ms.{c}": v for c, v in latencies.items()}})


VARIANTS = [_measured(p) for p in ("INT8", "FP16", "FP32")]


def choose(node_class: str = "edge-arm", variants=VARIANTS, **params) -> str:
    return choose_variant(variants, policy_from_params(params), node_class).precision


@pytest.mark.parametrize("precision", ["FP32", "FP16", "INT8", "int8"])
def test_an_explicit_precision_wins_over_every_other_ask(precision):
    assert choose(precision=precision, accuracy_floor="0.99", latency_budget_ms="0.1") == precision.upper()


def test_an_explicit_precision_that_is_not_registered_is_model_not_found():
    with pytest.raises(ModelNotFound, match="model 'digits' version 1 precision BF16 not found"):
        choose(precision="bf16")


@pytest.mark.parametrize(
    ("node_class", "floor", "expected"),
    [("edge-arm", "0.95", "FP16"), ("edge-arm", "0.9", "INT8"), ("edge-arm", "0.97", "FP32"),
     ("cloud-gpu", "0.95", "FP32"), ("cloud-gpu", "0.9", "FP32")],
    ids=["edge-fp16-is-fastest-above-0.95", "edge-int8-meets-0.9", "edge-only-fp32-meets-0.97",
         "cloud-fp32-is-fastest", "cloud-fp32-beats-int8"],
)
def test_an_accuracy_floor_gets_the_fastest_variant_meeting_it_on_that_node_class(node_class, floor, expected):
    assert choose(node_class, accuracy_floor=floor) == expected


@pytest.mark.parametrize(
    ("node_class", "budget", "expected"),
    [("edge-arm", "1.5", "FP16"), ("edge-arm", "5", "FP32"), ("edge-arm", "0.6", "INT8"),
     ("cloud-gpu", "0.45", "FP32"), ("cloud-gpu", "0.35", "FP32")],
    ids=["edge-fp16-fits-1.5", "edge-everything-fits", "edge-budget-equal-to-int8",
         "cloud-fp32-fits", "cloud-only-fp32-fits"],
)
def test_a_latency_budget_gets_the_most_accurate_variant_within_it(node_class, budget, expected):
    assert choose(node_class, latency_budget_ms=budget) == expected


@pytest.mark.parametrize(
    ("floor", "budget", "expected"),
    [("0.95", "1.5", "FP16"), ("0.9", "5", "INT8"), ("0.96", "2.0", "FP16")],
    ids=["one-fits-both", "fastest-of-all-that-fit-both", "fastest-of-two"],
)
def test_a_floor_and_a_budget_together_get_the_fastest_variant_meeting_both(floor, budget, expected):
    assert choose(accuracy_floor=floor, latency_budget_ms=budget) == expected


def test_an_accuracy_floor_no_variant_meets_is_failed_precondition_naming_the_best():
    with pytest.raises(FailedPrecondition) as info:
        choose(accuracy_floor="0.99")
    assert str(info.value) == ("no variant of model 'digits' meets accuracy_floor 0.99 "
                               "(best measured accuracy 0.9700)")


def test_a_budget_below_every_measured_latency_is_failed_precondition_naming_the_fastest():
    with pytest.raises(FailedPrecondition) as info:
        choose(latency_budget_ms="0.5")
    assert str(info.value) == ("no variant of model 'digits' fits latency_budget_ms 0.5 on edge-arm nodes "
                               "(fastest measured 0.600 ms)")


def test_a_floor_and_budget_that_no_single_variant_meets_is_failed_precondition():
    with pytest.raises(FailedPrecondition, match="fits latency_budget_ms 1.0 on edge-arm nodes"):
        choose(accuracy_floor="0.95", latency_budget_ms="1.0")


def test_a_budget_on_a_node_class_with_no_measurement_is_failed_precondition():
    with pytest.raises(FailedPrecondition) as info:
        choose("edge-x86", latency_budget_ms="100")
    assert str(info.value) == ("no variant of model 'digits' fits latency_budget_ms 100.0 on edge-x86 nodes "
                               "(no latency measured yet)")


def test_a_variant_without_measured_accuracy_never_meets_a_floor():
    variants = [_variant("INT8", {"latency_ms.edge-arm": "0.1"}), _measured("FP32")]
    assert choose(variants=variants, accuracy_floor="0.5") == "FP32"


def test_a_variant_without_measured_latency_counts_as_slowest_under_a_floor():
    variants = [_variant("FP16", {"accuracy": "0.99"}), _measured("FP32")]
    assert choose(variants=variants, accuracy_floor="0.9") == "FP32"


@pytest.mark.parametrize(
    "params",
    [{}, {"precision": "", "accuracy_floor": "", "latency_budget_ms": None}],
    ids=["nothing-asked", "empty-values"],
)
def test_without_any_ask_fp32_comes_first(params):
    assert policy_from_params(params).empty
    assert choose(**params) == "FP32"


def test_without_fp32_the_default_falls_to_fp16_then_int8():
    assert choose(variants=[_measured("INT8"), _measured("FP16")]) == "FP16"


@pytest.mark.parametrize(
    ("params", "expected"),
    [({"precision": "fp16"}, PrecisionPolicy(precision="FP16")),
     ({"accuracy_floor": 0.9, "latency_budget_ms": "12.5"},
      PrecisionPolicy(accuracy_floor=0.9, latency_budget_ms=12.5)),
     ({"accuracy_floor": 1}, PrecisionPolicy(accuracy_floor=1.0))],
    ids=["precision-upper-cased", "numbers-and-numeric-strings", "integers"],
)
def test_policy_from_params_reads_the_oip_request_parameters(params, expected):
    assert policy_from_params(params) == expected


@pytest.mark.parametrize(
    ("params", "message"),
    [({"accuracy_floor": "high"}, "parameter 'accuracy_floor' must be a number, got 'high'"),
     ({"latency_budget_ms": "10ms"}, "parameter 'latency_budget_ms' must be a number, got '10ms'"),
     ({"latency_budget_ms": [1]}, r"parameter 'latency_budget_ms' must be a number, got \[1\]"),
     ({"accuracy_floor": float("nan")}, "parameter 'accuracy_floor' must be a finite number, got nan"),
     ({"latency_budget_ms": "inf"}, "parameter 'latency_budget_ms' must be a finite number, got 'inf'")],
    ids=["word", "number-with-unit", "list", "nan-floor", "infinite-budget"],
)
def test_a_parameter_that_is_not_a_number_is_invalid_argument(params, message):
    with pytest.raises(InvalidArgument, match=message):
        policy_from_params(params)


@pytest.mark.parametrize(
    ("params", "message"),
    [({"accuracy_floor": 2}, "parameter 'accuracy_floor' must be from 0 to 1, got 2$"),
     ({"accuracy_floor": "-1"}, "parameter 'accuracy_floor' must be from 0 to 1, got '-1'$"),
     ({"latency_budget_ms": -5}, "parameter 'latency_budget_ms' must be at least 0, got -5$"),
     ({"accuracy_floor": "0.9", "latency_budget_ms": "-0.5"},
      "parameter 'latency_budget_ms' must be at least 0, got '-0.5'$")],
    ids=["floor-above-one", "negative-floor", "negative-budget", "negative-budget-beside-a-good-floor"],
)
def test_a_floor_or_budget_out_of_its_range_is_invalid_argument_naming_the_parameter(params, message):
    with pytest.raises(InvalidArgument, match=f"^{message}"):
        policy_from_params(params)


@pytest.mark.parametrize("params", [{"accuracy_floor": 0}, {"accuracy_floor": "1"}, {"latency_budget_ms": 0}],
                         ids=["zero-floor", "floor-of-one", "zero-budget"])
def test_the_edges_of_a_floor_or_budget_are_accepted(params):
    assert policy_from_params(params) == PrecisionPolicy(**{k: float(v) for k, v in params.items()})


def test_choosing_from_no_variants_is_model_not_found():
    with pytest.raises(ModelNotFound):
        choose_variant([], PrecisionPolicy(), "edge-arm")


@pytest.mark.parametrize(
    ("measured", "params", "expected"),
    [({"FP32": ("0.5", "0.0000"), "INT8": ("0.4", "1.0")}, {"latency_budget_ms": "0.5"}, "FP32"),
     ({"FP32": ("0.5", "0.0"), "INT8": ("0.4", "1.0")}, {"accuracy_floor": "0.1"}, "FP32"),
     ({"FP32": ("0.0", "1.0"), "INT8": ("0.5", "2.0")}, {"accuracy_floor": "0"}, "FP32")],
    ids=["zero-latency-fits-a-budget", "zero-latency-is-fastest", "zero-accuracy-meets-a-zero-floor"],
)
def test_a_measured_zero_is_a_measurement_not_a_missing_one(measured, params, expected):
    variants = [_variant(p, {"accuracy": acc, "latency_ms.edge-arm": lat}) for p, (acc, lat) in measured.items()]
    assert choose(variants=variants, **params) == expected
