"""Deployment specs: JSON in and out, defaults, and the checks that keep a bad spec out of the registry."""
from __future__ import annotations

import json
import re

import pytest

from services.common import deployment
from services.common.deployment import BatchingSpec, DeploymentSpec, PrecisionSpec, SchedulerSpec
from services.common.errors import InvalidArgument

FULL = {
    "model": "digits",
    "batching": {"max_batch_size": 32, "max_queue_delay_us": 500, "preferred_batch_sizes": [8, 16],
                 "max_queue_size": 100, "max_inflight_batches": 2},
    "precision": {"precision": "FP16", "accuracy_floor": 0.95, "latency_budget_ms": 4.5},
    "scheduler": {"policy": "least_loaded", "alpha": 1, "beta": 0.5, "gamma": 0, "delta": 0.25,
                  "threshold": 0.1},
    "cloud_fallback": False,
    "tiers": ["edge"],
}


def test_a_spec_with_only_a_model_takes_every_default():
    assert deployment.from_dict({"model": "digits"}) == DeploymentSpec(model="digits")


def test_from_dict_reads_every_section_turning_lists_into_tuples_and_integers_into_floats():
    spec = deployment.from_dict(FULL)
    assert spec.batching == BatchingSpec(32, 500, (8, 16), 100, 2)
    assert spec.precision == PrecisionSpec("FP16", 0.95, 4.5)
    assert spec.scheduler == SchedulerSpec("least_loaded", 1.0, 0.5, 0.0, 0.25, 0.1)
    assert isinstance(spec.scheduler.alpha, float)
    assert (spec.cloud_fallback, spec.tiers) == (False, ("edge",))


@pytest.mark.parametrize("data", [{"model": "digits"}, FULL], ids=["defaults", "every-field"])
def test_to_json_and_from_json_round_trip(data):
    spec = deployment.from_dict(data)
    text = deployment.to_json(spec)
    assert deployment.from_json(text) == spec
    assert json.loads(text)["model"] == "digits"


def test_to_json_is_stable_for_equal_specs():
    assert deployment.to_json(deployment.from_dict(FULL)) == deployment.to_json(deployment.from_dict(dict(FULL)))


@pytest.mark.parametrize(
    ("data", "message"),
    [({"model": "digits", "batchng": {}}, r"deployment 'digits' has unknown fields \['batchng'\]"),
     ({"model": "digits", "scheduler": {"alpah": 1}},
      r"deployment 'digits.scheduler' has unknown fields \['alpah'\]"),
     ({"model": "digits", "precision": {"floor": 0.9, "budget": 3}},
      r"deployment 'digits.precision' has unknown fields \['budget', 'floor'\]")],
    ids=["top-level", "nested", "two-fields-sorted"],
)
def test_an_unknown_field_is_rejected_by_name(data, message):
    with pytest.raises(InvalidArgument, match=message):
        deployment.from_dict(data)


@pytest.mark.parametrize(
    ("scheduler", "message"),
    [({"policy": "fastest"}, r"scheduler policy 'fastest' must be one of \['edgeai', 'least_loaded', "
                             r"'round_robin', 'random'\]"),
     ({"policy": ""}, "scheduler policy '' must be one of"),
     ({"alpha": -0.1}, "scheduler weights must not be negative"),
     ({"delta": -1}, "scheduler weights must not be negative"),
     ({"alpha": "high"}, "deployment field 'digits.scheduler.alpha' must be float, got 'high'"),
     ({"threshold": None}, "deployment field 'digits.scheduler.threshold' must be float, got None"),
     ({"gamma": True}, "deployment field 'digits.scheduler.gamma' must be float, got True")],
    ids=["unknown-policy", "empty-policy", "negative-alpha", "negative-delta", "weight-not-a-number",
         "threshold-missing", "weight-a-boolean"],
)
def test_a_bad_policy_or_weight_is_rejected(scheduler, message):
    with pytest.raises(InvalidArgument, match=message):
        deployment.from_dict({"model": "digits", "scheduler": scheduler})


@pytest.mark.parametrize(
    ("data", "message"),
    [({"model": ""}, "deployment needs a 'model'"),
     ({}, "missing 1 required positional argument: 'model'"),
     ({"model": "digits", "batching": {"max_batch_size": 0}},
      r"must be from 1 to 2147483647, got 0 \(max_batch_size must be positive\)$"),
     ({"model": "digits", "batching": {"max_queue_delay_us": -1}},
      r"must be from 0 to 4294967295, got -1 \(max_queue_delay_us must not be negative\)$"),
     ({"model": "digits", "batching": {"max_batch_size": "8"}}, "'digits.batching.max_batch_size' must be int"),
     ({"model": "digits", "batching": {"preferred_batch_sizes": 8}},
      "'digits.batching.preferred_batch_sizes' must be a list, got 8"),
     ({"model": "digits", "precision": {"accuracy_floor": "0.9"}},
      "'digits.precision.accuracy_floor' must be float, got '0.9'"),
     ({"model": "digits", "tiers": ["edge", "fog"]}, r"unknown tiers \['fog'\]"),
     ({"model": "digits", "tiers": "edge"}, "'digits.tiers' must be a list"),
     ({"model": "digits", "cloud_fallback": "no"}, "'digits.cloud_fallback' must be bool"),
     ({"model": "digits", "batching": []}, "deployment 'digits.batching' must be an object"),
     (["digits"], r"deployment '\?' must be an object")],
    ids=["empty-model", "no-model", "zero-batch", "negative-delay", "string-number", "size-not-a-list",
         "floor-as-string", "unknown-tier", "tiers-not-a-list", "bool-as-string", "section-not-an-object",
         "not-an-object"],
)
def test_an_invalid_spec_is_invalid_argument_saying_what_is_wrong(data, message):
    with pytest.raises(InvalidArgument, match=message):
        deployment.from_dict(data)


@pytest.mark.parametrize(
    ("batching", "message"),
    [({"preferred_batch_sizes": [0]}, "'digits.batching.preferred_batch_sizes' must hold sizes from 1 to "
                                      r"max_batch_size 64, got \[0\]"),
     ({"preferred_batch_sizes": [4, -4]}, r"'digits.batching.preferred_batch_sizes' .* got \[-4\]"),
     ({"max_batch_size": 32, "preferred_batch_sizes": [8, 100000]},
      r"'digits.batching.preferred_batch_sizes' must hold sizes from 1 to max_batch_size 32, got \[100000\]"),
     ({"max_batch_size": 2**31}, "'digits.batching.max_batch_size' must be from 1 to 2147483647, got 2147483648"),
     ({"max_queue_delay_us": 2**32}, "'digits.batching.max_queue_delay_us' must be from 0 to 4294967295"),
     ({"max_queue_size": 0}, "'digits.batching.max_queue_size' must be from 1 to 4294967295, got 0"),
     ({"max_inflight_batches": 2**40}, "'digits.batching.max_inflight_batches' must be from 1 to 4294967295")],
    ids=["zero-size", "negative-size", "size-over-max-batch", "batch-over-int32", "delay-over-uint32",
         "empty-queue", "inflight-over-uint32"],
)
def test_batching_integers_out_of_what_the_wire_carries_are_invalid_argument_naming_the_field(batching, message):
    with pytest.raises(InvalidArgument, match=message):
        deployment.from_dict({"model": "digits", "batching": batching})


def test_preferred_sizes_from_one_to_max_batch_size_are_accepted():
    spec = deployment.from_dict({"model": "digits", "batching": {"max_batch_size": 8, "preferred_batch_sizes": [1, 8]}})
    assert spec.batching.preferred_batch_sizes == (1, 8)


@pytest.mark.parametrize("text", ["{", "", "model: digits"], ids=["truncated", "empty", "yaml"])
def test_text_that_is_not_json_is_invalid_argument(text):
    with pytest.raises(InvalidArgument, match="deployment spec is not JSON"):
        deployment.from_json(text)


def test_a_rollout_reads_from_json_and_splits_requests_that_name_no_version():
    spec = deployment.from_dict({"model": "digits", "rollout": {"stable": "1", "canary": "2", "canary_percent": 10}})
    assert spec.rollout == deployment.RolloutSpec("1", "2", 10.0)
    assert deployment.from_json(deployment.to_json(spec)) == spec
    assert [deployment.rollout_version(spec.rollout, d) for d in (0.0, 0.0999, 0.1, 0.5, 0.9999)] == \
        ["2", "2", "1", "1", "1"]
    assert deployment.rollout_version(deployment.RolloutSpec(), 0.0) == ""  # no pin: the latest
    full = deployment.RolloutSpec(stable="", canary="3", canary_percent=100)
    assert {deployment.rollout_version(full, d) for d in (0.0, 0.5, 0.99)} == {"3"}


@pytest.mark.parametrize(("rollout", "message"), [
    ({"canary": "2", "canary_percent": 120}, "canary_percent must be between 0 and 100"),
    ({"stable": "2", "canary": "2", "canary_percent": 5}, "canary version 2 is also the stable version"),
    ({"canary_percent": 5}, "canary_percent needs a canary version"),
    ({"canary": 2}, "deployment field 'digits.rollout.canary' must be str"),
])
def test_a_rollout_that_cannot_work_is_refused(rollout, message):
    with pytest.raises(InvalidArgument, match=message):
        deployment.from_dict({"model": "digits", "rollout": rollout})


def test_the_largest_batching_values_accepted_fit_the_route_reply_and_model_config():
    from services.pb.cnei import frontdoor_pb2
    from services.pb.inference import grpc_service_pb2

    top = {name: high for name, (_, high) in deployment.BATCHING_RANGES.items()}
    spec = deployment.from_dict({"model": "digits", "attempt_timeout_ms": 5e6,  # above the longest queue delay
                                 "batching": {**top, "preferred_batch_sizes": [top["max_batch_size"]]}})
    b = spec.batching
    reply = frontdoor_pb2.RouteReply(max_batch_size=b.max_batch_size, max_queue_delay_us=b.max_queue_delay_us,
                                     max_queue_size=b.max_queue_size, max_inflight_batches=b.max_inflight_batches,
                                     preferred_batch_sizes=b.preferred_batch_sizes)
    config = grpc_service_pb2.ModelConfig(max_batch_size=b.max_batch_size)
    config.dynamic_batching.preferred_batch_size.extend(b.preferred_batch_sizes)
    config.dynamic_batching.max_queue_delay_microseconds = b.max_queue_delay_us
    assert (reply.max_batch_size, list(config.dynamic_batching.preferred_batch_size)) == \
        (2**31 - 1, [2**31 - 1])


@pytest.mark.parametrize("delay_us, timeout_ms", [(2_000_000, 2000.0), (3_000_000, 2000.0), (500_000, 100.0)])
def test_a_queue_delay_an_attempt_could_never_wait_out_is_refused(delay_us, timeout_ms):
    with pytest.raises(InvalidArgument, match=rf"batching.max_queue_delay_us \({delay_us} µs\) must be below "
                                              rf"attempt_timeout_ms \({timeout_ms:g} ms\)"):
        deployment.check_put(deployment.from_dict({"model": "digits", "attempt_timeout_ms": timeout_ms,
                                                   "batching": {"max_queue_delay_us": delay_us}}))


def test_a_stored_spec_a_later_put_rule_refuses_still_reads_back():
    """A deployment stored before the queue delay rule still reads (serving goes on); only
    putting it again is refused."""
    text = deployment.to_json(deployment.DeploymentSpec(
        model="digits", attempt_timeout_ms=40.0, batching=deployment.BatchingSpec(max_queue_delay_us=50_000)))
    spec = deployment.from_json(text)
    assert spec.batching.max_queue_delay_us == 50_000
    with pytest.raises(InvalidArgument, match="must be below attempt_timeout_ms"):
        deployment.check_put(spec)


def test_a_queue_delay_below_the_attempt_timeout_is_accepted():
    spec = deployment.check_put(deployment.from_dict({"model": "digits", "batching": {"max_queue_delay_us": 1_999_000}}))
    assert spec.batching.max_queue_delay_us == 1_999_000


@pytest.mark.parametrize(("data", "field"), [
    ({"precision": {"precision": "FP8"}}, "digits.precision.precision"),
    ({"joint": {"edge_precision": "INT4"}}, "digits.joint.edge_precision"),
    ({"joint": {"cloud_precision": "fp64"}}, "digits.joint.cloud_precision"),
    ({"ensemble": [{"model": "a", "inputs": ["x=x"], "outputs": ["y=y"], "precision": "FP8"}]},
     "digits.ensemble[0].precision")], ids=["default", "edge", "cloud", "ensemble-step"])
def test_a_precision_that_is_none_of_the_precisions_is_invalid_argument_naming_the_field(data, field):
    with pytest.raises(InvalidArgument, match=rf"^deployment field '{re.escape(field)}' must be one of "
                                              r"\['FP32', 'FP16', 'INT8'\] \(or empty\), got '\w+'$"):
        deployment.check_put(deployment.from_dict({"model": "digits", **data}))


def test_precisions_in_any_case_are_accepted():
    spec = deployment.from_dict({"model": "digits", "precision": {"precision": "int8"},
                                 "joint": {"edge_precision": "Int8", "cloud_precision": "fp16"}})
    assert deployment.check_put(spec) is spec


@pytest.mark.parametrize(("data", "message"), [
    ({"precision": {"accuracy_floor": 2}}, "'digits.precision.accuracy_floor' must be from 0 to 1, got 2$"),
    ({"precision": {"accuracy_floor": -1}}, "'digits.precision.accuracy_floor' must be from 0 to 1, got -1$"),
    ({"precision": {"latency_budget_ms": -5}}, "'digits.precision.latency_budget_ms' must be at least 0, got -5$"),
    ({"scheduler": {"threshold": -5}}, "'digits.scheduler.threshold' must be from 0 to 1, got -5$"),
    ({"scheduler": {"threshold": 7}}, "'digits.scheduler.threshold' must be from 0 to 1, got 7$"),
    ({"joint": {"mode": "sync", "latency_threshold_ms": -3}},
     "'digits.joint.latency_threshold_ms' must be at least 0, got -3$"),
    ({"attempt_timeout_ms": 0.5}, "'digits.attempt_timeout_ms' must be from 1 to 4294967295, got 0.5$"),
    ({"attempt_timeout_ms": 2**32}, "'digits.attempt_timeout_ms' must be from 1 to 4294967295, got 4294967296$"),
    ({"tiers": []}, r"'digits.tiers' must name a tier the model can be served on, got \[\]$"),
    ({"tiers": ["cloud"], "cloud_fallback": False},
     r"'digits.tiers' must name a tier the model can be served on, got \['cloud'\] \(the cloud serves only "
     r"with cloud_fallback\)$"),
    ({"scheduler": {"alpha": 0, "beta": 0, "gamma": 0, "delta": 0}},
     r"'digits.scheduler' weights must not all be 0 under the edgeai policy \(every node would score 0\)$"),
], ids=["floor-above-one", "negative-floor", "negative-budget", "negative-threshold", "threshold-above-one",
        "negative-latency-threshold", "timeout-under-a-millisecond", "timeout-over-uint32", "no-tiers",
        "cloud-without-fallback", "no-weights"])
def test_a_spec_that_could_never_serve_as_asked_is_invalid_argument_at_put_naming_the_field(data, message):
    with pytest.raises(InvalidArgument, match=f"^deployment field {message}"):
        deployment.check_put(deployment.from_dict({"model": "digits", **data}))


@pytest.mark.parametrize("data", [
    {"precision": {"accuracy_floor": 0, "latency_budget_ms": 0}},
    {"precision": {"accuracy_floor": 1}},
    {"scheduler": {"threshold": 0}},
    {"scheduler": {"threshold": 1, "alpha": 0, "beta": 0, "gamma": 0}},
    {"scheduler": {"policy": "round_robin", "alpha": 0, "beta": 0, "gamma": 0, "delta": 0}},
    {"joint": {"mode": "sync", "latency_threshold_ms": 0}},
    {"attempt_timeout_ms": 1, "batching": {"max_queue_delay_us": 0}},
    {"attempt_timeout_ms": 2**32 - 1},
    {"tiers": ["cloud"]},
    {"tiers": [], "ensemble": [{"model": "a", "inputs": ["x=x"], "outputs": ["y=y"]}]},
], ids=["zero-floor-and-budget", "floor-of-one", "zero-threshold", "threshold-of-one-one-weight",
        "no-weights-without-edgeai", "zero-latency-threshold", "one-millisecond-timeout", "uint32-timeout",
        "cloud-with-fallback", "ensemble-without-tiers"])
def test_the_edges_of_each_range_are_accepted_at_put(data):
    spec = deployment.from_dict({"model": "digits", **data})
    assert deployment.check_put(spec) is spec


def test_a_stored_spec_that_could_never_serve_still_reads_back():
    """Specs stored before these put rules still read (a list of deployments goes on working);
    putting one again is refused."""
    text = deployment.to_json(DeploymentSpec(model="digits", tiers=(), precision=PrecisionSpec(accuracy_floor=2.0)))
    spec = deployment.from_json(text)
    assert (spec.tiers, spec.precision.accuracy_floor) == ((), 2.0)
    with pytest.raises(InvalidArgument, match="digits.precision.accuracy_floor"):
        deployment.check_put(spec)
