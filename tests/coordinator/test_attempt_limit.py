"""One attempt's limit at a node: the deployment's attempt timeout, stretched for a variant
measured slower over the rows of its largest node call."""
from __future__ import annotations

import pytest

from services.common.deployment import BatchingSpec, DeploymentSpec
from services.coordinator.attempt_limit import attempt_limit_s, call_rows, expected_call_s
from tests.coordinator.mesh import variant

SPEC = DeploymentSpec(model="m", attempt_timeout_ms=2000, batching=BatchingSpec(max_queue_delay_us=100_000))


@pytest.mark.parametrize(("metadata", "rows", "limit_s"), [
    ({}, 64, 2.0),
    ({"latency_ms.cloud": "500"}, 64, 2.0),
    ({"latency_ms.edge": "0.05"}, 64, 2.0),
    ({"latency_ms.edge": "30"}, 64, 2 * 30 * 64 / 1e3 + 0.1),
    ({"latency_ms.edge": "1500"}, 1, 2 * 1.5 + 0.1),
], ids=["unmeasured", "measured-on-another-class", "fast", "slow-over-many-rows", "slow-alone"])
def test_an_attempt_gets_the_deployments_timeout_or_two_calls_of_its_measured_time_whichever_is_longer(
        metadata, rows, limit_s):
    assert attempt_limit_s(SPEC, variant(**metadata), "edge", rows) == pytest.approx(limit_s)


def test_an_unmeasured_variant_has_no_expected_call_time():
    assert expected_call_s(variant(), "edge", 8) is None
    assert expected_call_s(variant(**{"latency_ms.edge": "2"}), "edge", 8) == pytest.approx(0.016)


@pytest.mark.parametrize(("max_batch_size", "rows", "expected"), [
    ("8", 1, 8), ("8", 3, 8), ("128", 3, 64), ("0", 5, 5), ("0", 0, 1)],
    ids=["a-batch-of-the-variants-rows", "a-batch", "a-batch-of-the-deployments-rows", "unbatched", "no-rows"])
def test_a_request_may_ride_in_a_node_call_of_the_batching_s_rows_or_alone_unbatched(max_batch_size, rows, expected):
    assert call_rows(DeploymentSpec(model="m"), variant(max_batch_size=max_batch_size), rows) == expected
