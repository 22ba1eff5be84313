"""Coordinator core helpers: request deadline, Triton priority levels, per-variant batch settings, tiers."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from services.common.deployment import BatchingSpec, DeploymentSpec, serving_tiers
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common import batcher
from services.common.batch_formation import BatchConfig
from services.common.batcher import DEFAULT_PRIORITY_LEVEL, priority_level, request_deadline
from services.common.model_spec import ModelVariant, TensorSpec
from services.coordinator import placer
from services.coordinator.node_batchers import batch_config

NOW = 1000.0
DEFAULT_S = 30.0


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch):
    monkeypatch.setattr(batcher, "time", SimpleNamespace(monotonic=lambda: NOW))  # request_deadline's clock


@pytest.mark.parametrize(
    ("params", "grpc_deadline_s", "expected"),
    [({}, None, NOW + DEFAULT_S),
     ({}, 2.0, NOW + 2.0),
     ({}, 60.0, NOW + 60.0),
     ({"timeout_us": 500_000}, None, NOW + 0.5),
     ({"timeout_us": 60_000_000}, None, NOW + DEFAULT_S),
     ({"timeout_us": 500_000}, 2.0, NOW + 0.5),
     ({"timeout_us": 5_000_000}, 2.0, NOW + 2.0),
     ({"timeout_us": "250000"}, None, NOW + 0.25),
     ({"timeout_us": 0}, 2.0, NOW + 2.0),
     ({"timeout_us": "0"}, 2.0, NOW + 2.0),
     ({"timeout_us": ""}, None, NOW + DEFAULT_S),
     ({"timeout": 500_000}, 2.0, NOW + 0.5)],
    ids=["default-when-nothing-set", "grpc-deadline", "longer-grpc-deadline-replaces-the-default",
         "timeout-us-before-default", "default-before-timeout-us", "timeout-us-before-grpc",
         "grpc-before-timeout-us", "timeout-us-as-string", "zero-timeout-us-is-none",
         "zero-string-timeout-us-is-none", "empty-timeout-us-is-none",
         "tritonclient-timeout-name"],
)
def test_the_request_deadline_is_the_earliest_of_timeout_us_and_the_grpc_deadline_or_default(
        params, grpc_deadline_s, expected):
    assert request_deadline(params, grpc_deadline_s, DEFAULT_S) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("params", "expected"),
    [({}, DEFAULT_PRIORITY_LEVEL), ({"priority": 0}, DEFAULT_PRIORITY_LEVEL),
     ({"priority": None}, DEFAULT_PRIORITY_LEVEL), ({"priority": 1}, 1), ({"priority": "7"}, 7)],
    ids=["unset", "zero-means-default", "null", "explicit", "string"],
)
def test_priority_level_follows_triton_where_zero_means_the_default_level(params, expected):
    assert priority_level(params) == expected


def test_the_default_level_is_served_after_any_explicit_level():
    assert priority_level({"priority": 1_000_000}) < priority_level({})


def _deadline(params: dict) -> float:
    return request_deadline(params, None, DEFAULT_S)


@pytest.mark.parametrize(
    ("read", "params", "message"),
    [(priority_level, {"priority": "high"}, "parameter 'priority' must be a number, got 'high'"),
     (priority_level, {"priority": "1.5"}, "parameter 'priority' must be an integer from 0 to 18446744073709551615, "
                                           "got '1.5'"),
     (priority_level, {"priority": -3}, "parameter 'priority' must be an integer from 0 to 18446744073709551615, "
                                        "got -3"),
     (_deadline, {"timeout_us": "soon"}, "parameter 'timeout_us' must be a number, got 'soon'"),
     (_deadline, {"timeout_us": [1]}, r"parameter 'timeout_us' must be a number, got \[1\]")],
    ids=["priority-word", "priority-fraction", "priority-negative", "timeout-word", "timeout-list"],
)
def test_a_priority_that_is_no_uint64_or_a_timeout_that_is_not_a_number_is_invalid_argument(read, params, message):
    with pytest.raises(InvalidArgument, match=message):
        read(params)


def _variant(max_batch_size: str | None = None, first_dim: int = -1) -> ModelVariant:
    metadata = {} if max_batch_size is None else {"max_batch_size": max_batch_size}
    return ModelVariant(name="digits", version="1", precision="FP32", sha256="0", size_bytes=1,
                        inputs=[TensorSpec("input", "FP32", (first_dim, 64))],
                        outputs=[TensorSpec("probabilities", "FP32", (first_dim, 10))], metadata=metadata)


@pytest.mark.parametrize(
    ("spec_max", "variant", "expected"),
    [(64, _variant("8"), 8), (16, _variant(), 16), (64, _variant("1024"), 64), (64, _variant(first_dim=1), 1)],
    ids=["variant-caps-the-spec", "spec-below-the-default-1024", "spec-below-the-variant",
         "fixed-batch-model-sends-one-request-at-a-time"],
)
def test_batch_config_caps_max_batch_size_by_the_variants(spec_max, variant, expected):
    assert batch_config(DeploymentSpec("digits", BatchingSpec(max_batch_size=spec_max)), variant).max_batch_size \
        == expected


def test_batch_config_carries_the_rest_of_the_deployments_batching_settings():
    batching = BatchingSpec(max_batch_size=32, max_queue_delay_us=750, preferred_batch_sizes=(8, 16),
                            max_queue_size=10, max_inflight_batches=3)
    assert batch_config(DeploymentSpec("digits", batching), _variant()) == BatchConfig(
        max_batch_size=32, max_queue_delay_us=750, preferred_batch_sizes=(8, 16), max_queue_size=10,
        max_inflight_batches=3)


def test_worker_count_means_one_per_cpu_for_zero():
    from services.coordinator.workers import worker_count

    assert worker_count(0, cpus=4) == 4
    assert worker_count(3, cpus=4) == 3
    assert worker_count(0, cpus=0) >= 1


def test_worker_env_gives_each_worker_its_index_outbox_and_the_shared_metrics_dir():
    from services.coordinator.workers import worker_env

    env = worker_env({"CNEI_COORDINATOR_WORKERS": "0", "KEEP": "x"}, 1, "/tmp/m", "/data/outbox")
    assert env["CNEI_COORDINATOR_WORKERS"] == "1"  # a worker never supervises
    assert env["CNEI_COORDINATOR_WORKER_INDEX"] == "1"
    assert env["CNEI_COORDINATOR_METRICS_PORT"] == "0"  # the supervisor serves /metrics
    assert env["PROMETHEUS_MULTIPROC_DIR"] == "/tmp/m"
    assert env["CNEI_COORDINATOR_OUTBOX_PATH"] == "/data/outbox.1"
    assert env["KEEP"] == "x"
    assert "CNEI_COORDINATOR_OUTBOX_PATH" not in worker_env({}, 0, "/tmp/m", "")


ANYWHERE = DeploymentSpec("digits")
CLOUD_ONLY = DeploymentSpec("digits", tiers=("cloud",))
EDGE_ONLY = DeploymentSpec("digits", tiers=("edge",), cloud_fallback=False)
NO_FALLBACK = DeploymentSpec("digits", cloud_fallback=False)


@pytest.mark.parametrize(
    ("spec", "tier", "tiers"),
    [(ANYWHERE, "", {"edge", "cloud"}), (ANYWHERE, "edge", {"edge"}), (ANYWHERE, "cloud", {"cloud"}),
     (CLOUD_ONLY, "cloud", {"cloud"}), (EDGE_ONLY, "edge", {"edge"}), (NO_FALLBACK, "edge", {"edge"})],
    ids=["unset", "edge", "cloud", "cloud-of-cloud-only", "edge-of-edge-only", "edge-without-fallback"])
def test_the_tier_parameter_narrows_where_a_request_may_run(spec, tier, tiers):
    assert serving_tiers(placer.restrict_tier(spec, {"tier": tier})) == tiers


@pytest.mark.parametrize(
    ("spec", "tier", "allowed"),
    [(CLOUD_ONLY, "edge", r"\['cloud'\]"), (EDGE_ONLY, "cloud", r"\['edge'\]"),
     (NO_FALLBACK, "cloud", r"\['edge'\]")],
    ids=["edge-for-cloud-only", "cloud-for-edge-only", "cloud-without-fallback"])
def test_a_tier_the_deployment_does_not_run_on_is_failed_precondition(spec, tier, allowed):
    with pytest.raises(FailedPrecondition, match=f"not deployed on the {tier} tier \\(its deployment allows {allowed}\\)"):
        placer.restrict_tier(spec, {"tier": tier})


def test_a_tier_that_is_no_tier_is_invalid_argument():
    with pytest.raises(InvalidArgument, match="parameter 'tier' must be 'edge' or 'cloud', got 'fog'"):
        placer.restrict_tier(ANYWHERE, {"tier": "fog"})
