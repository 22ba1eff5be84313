"""An edge runtime called directly behaves as Triton for the max_batch_size its ModelConfig shows
(its own batching's): a client's request of more rows is INVALID_ARGUMENT in Triton's words; a
coordinator's batch (FORMED_BATCH) is held to the model's own limit only, since a deployment may
batch more rows than the runtime merges."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from services.common import oip
from services.common import settings as cfg
from services.common.errors import InvalidArgument
from services.common.model_spec import FORMED_BATCH
from services.common.oip_convert import model_config
from services.common.registry_client import RegistryClient
from services.edge_runtime.cache import DiskCache
from services.edge_runtime.core import EdgeRuntime
from services.edge_runtime.settings import PREFIX, RuntimeSettings


@pytest.fixture
async def runtime(registry, tmp_path):
    """A runtime over the module's registry, made with the given batching settings."""
    made: list[EdgeRuntime] = []
    client = RegistryClient(registry, timeout=10)

    def make(**settings) -> EdgeRuntime:
        base = replace(cfg.load(RuntimeSettings, PREFIX), cache_dir=str(tmp_path), measure_on_load=False)
        made.append(EdgeRuntime(replace(base, **settings), client, DiskCache(tmp_path)))
        return made[-1]
    yield make
    for r in made:
        await r.drain()
        r.close()
    await client.close()


def _rows(model: str, count: int, **parameters) -> oip.InferRequest:
    return oip.InferRequest(model, {"input": np.zeros((count, 64), np.float32)}, parameters=parameters)


async def test_a_client_request_over_the_runtimes_batch_size_is_refused_and_a_coordinators_batch_is_not(
        runtime, push_digits):
    model = (await push_digits("rows")).name
    core = runtime(batching=True, batch_max_size=4)
    assert (await model_config(core, model, "")).config.max_batch_size == 4
    with pytest.raises(InvalidArgument, match=f"^inference request batch-size must be <= 4 for '{model}'$"):
        await core.infer(_rows(model, 5))
    assert (await core.infer(_rows(model, 4))).outputs["probabilities"].shape == (4, 10)
    formed = await core.infer(_rows(model, 5, **{FORMED_BATCH: True}))
    assert formed.outputs["probabilities"].shape == (5, 10)


async def test_a_runtime_that_does_not_batch_holds_requests_to_the_models_own_batch_size(runtime, push_digits):
    model = (await push_digits("rows")).name
    core = runtime(batching=False, batch_max_size=4)
    assert (await model_config(core, model, "")).config.max_batch_size == 1024
    assert (await core.infer(_rows(model, 5))).outputs["probabilities"].shape == (5, 10)
    with pytest.raises(InvalidArgument, match=f"^inference request batch-size must be <= 1024 for '{model}'$"):
        await core.infer(_rows(model, 1025, **{FORMED_BATCH: True}))
