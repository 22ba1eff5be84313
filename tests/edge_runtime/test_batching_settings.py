"""The runtime's batching settings are checked when it starts."""
from __future__ import annotations

import pytest

from services.edge_runtime.execution import batch_limit, check_batching
from services.edge_runtime.settings import RuntimeSettings


@pytest.mark.parametrize(("changes", "message"), [
    ({"batch_max_size": -1}, "CNEI_RUNTIME_BATCH_MAX_SIZE must be at least 0, got -1"),
    ({"batch_queue_delay_us": -5}, "CNEI_RUNTIME_BATCH_QUEUE_DELAY_US must be at least 0, got -5"),
    ({"batch_queue_size": 0}, "CNEI_RUNTIME_BATCH_QUEUE_SIZE must be at least 1, got 0"),
])
def test_a_batching_setting_out_of_range_is_refused_naming_it(changes, message):
    with pytest.raises(ValueError, match=message):
        check_batching(RuntimeSettings(**changes))


def test_the_defaults_and_edge_values_pass():
    check_batching(RuntimeSettings())
    check_batching(RuntimeSettings(batch_max_size=0, batch_queue_delay_us=0, batch_queue_size=1))


@pytest.mark.parametrize(("configured", "model_max", "cap", "limit"), [
    (64, 128, 0, 64),    # the runtime's setting
    (0, 128, 0, 128),    # 0: the model's own limit
    (64, 16, 0, 16),     # never past the model's
    (64, 128, 8, 8),     # nor past the deployment's max_batch_size
    (0, 128, 32, 32),
    (4, 128, 8, 4),
    (64, 128, 1, 1),     # a deployment that batches nothing: one request a call
])
def test_a_runtime_batch_keeps_within_its_setting_the_model_and_the_deployment(configured, model_max, cap, limit):
    assert batch_limit(configured, model_max, cap) == limit
