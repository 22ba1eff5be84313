"""An edge runtime's cnei_inference_requests_total carries a model name as a label only for a
model it has resolved: malformed requests for names clients make up are counted under `_unknown`,
those for its model under the model. The runtime core behind a real OIP gRPC server, against the
module's registry process."""
from __future__ import annotations

from prometheus_client import REGISTRY

from tests.edge_runtime.oip_serving import send_row, serving


def _counts(model: str) -> dict[str, float]:
    return {s.labels["outcome"]: s.value for m in REGISTRY.collect() if m.name == "cnei_inference_requests"
            for s in m.samples if s.name.endswith("_total") and s.labels["model"] == model}


def _labelled(prefix: str) -> list[str]:
    return sorted({s.labels["model"] for m in REGISTRY.collect()
                   if m.name in ("cnei_inference_requests", "cnei_inference_request_duration_seconds")
                   for s in m.samples if s.labels.get("model", "").startswith(prefix)})


async def test_malformed_requests_count_under_unknown_for_made_up_names_and_under_the_model_for_its_own(
        registry, push_digits, tmp_path):
    async with serving(registry, push_digits, tmp_path, "labels") as (stub, _, model):
        unknown, own = _counts("_unknown"), _counts(model)
        assert [await send_row(stub, f"made-up-runtime-{i}", raw_contents=2) for i in range(3)] == \
            ["INVALID_ARGUMENT"] * 3
        assert await send_row(stub, model, raw_contents=2) == "INVALID_ARGUMENT"
        assert _labelled("made-up-runtime-") == []
        assert _counts("_unknown").get("invalid_argument", 0) - unknown.get("invalid_argument", 0) == 3
        assert _counts(model).get("invalid_argument", 0) - own.get("invalid_argument", 0) == 1
