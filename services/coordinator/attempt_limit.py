"""How long one attempt at a node may take before its request fails over: the deployment's
`attempt_timeout_ms`, stretched for a variant its measured latency says takes longer over the
rows of one node call (the coordinator's batches and its front door's routes alike)."""
from __future__ import annotations

from services.common.deployment import DeploymentSpec
from services.common.model_spec import ModelVariant
from services.coordinator.precision import latency_ms

# An attempt may find one node call of as many rows running ahead of its own (a node's batcher
# keeps calls in flight back to back), so it is given the time of this many calls
CALLS_WAITED = 2


def expected_call_s(variant: ModelVariant, node_class: str, rows: int) -> float | None:
    """What one node call of `rows` rows of the variant is expected to take on the node class:
    its measured batch-1 latency (`latency_ms.<class>`) times the rows, which batching only
    shortens (None: not measured there)."""
    measured = latency_ms(variant, node_class)
    return None if measured is None else measured * max(1, rows) / 1e3


def attempt_limit_s(spec: DeploymentSpec, variant: ModelVariant, node_class: str, rows: int) -> float:
    """One attempt's limit at a node of `node_class` for a node call of up to `rows` rows: the
    deployment's `attempt_timeout_ms`, or, for a variant measured slower, `CALLS_WAITED` such
    calls plus the batching's queue delay, so a slow but working model is not failed over (and
    run again elsewhere) at every try."""
    configured = spec.attempt_timeout_ms / 1e3
    expected = expected_call_s(variant, node_class, rows)
    if expected is None:
        return configured
    return max(configured, CALLS_WAITED * expected + spec.batching.max_queue_delay_us / 1e6)


def call_rows(spec: DeploymentSpec, variant: ModelVariant, rows: int) -> int:
    """The rows of the largest node call a request of `rows` rows may ride in: a batch of the
    deployment's `max_batch_size` (capped by the variant's), or the request alone, unbatched."""
    batched = min(spec.batching.max_batch_size, variant.max_batch_size) if variant.max_batch_size else 0
    return max(1, rows, batched)
