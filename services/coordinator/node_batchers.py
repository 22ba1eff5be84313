"""One batcher per (variant, node): the requests a variant serves on a node ride in its batches,
under the deployment's batching capped by the variant; a node leaving takes its batchers along."""
from __future__ import annotations

from dataclasses import replace

from services.common.background import Background
from services.common.batch_formation import BatchConfig
from services.common.batcher import Batcher
from services.common.deployment import DeploymentSpec
from services.common.errors import CneiError, ErrorCode, Unavailable
from services.common.model_spec import ModelVariant
from services.common.stats import StatsBook
from services.coordinator.forwarder import sender
from services.coordinator.nodes_view import NodesView
from services.coordinator.placer import Placement

# A node's answer that one request of a batch was wrong (ONNX Runtime's InvalidArgument for an
# index out of range fails the whole call): the batch's requests are sent again one by one, so
# its batch-mates are answered (RESOURCE_EXHAUSTED, a busy node, is left as it is)
REQUEST_ERRORS = {ErrorCode.INVALID_ARGUMENT, ErrorCode.NOT_FOUND, ErrorCode.ALREADY_EXISTS,
                  ErrorCode.FAILED_PRECONDITION}


def about_a_request(error: Exception) -> bool:
    """Whether a failed batch's `error` may be one request's own (`REQUEST_ERRORS`)."""
    return isinstance(error, CneiError) and error.code in REQUEST_ERRORS


def batch_config(spec: DeploymentSpec, variant: ModelVariant) -> BatchConfig:
    """The deployment's batching, capped by what the variant accepts (1 for unbatched models)."""
    b = spec.batching
    limit = min(b.max_batch_size, variant.max_batch_size) if variant.max_batch_size else 1
    return replace(b, max_batch_size=max(1, limit))


class NodeBatchers:
    """`batchers` by (variant key, node id); each books the node calls it makes (Triton's
    executions) in `stats`, and goes over the fast lane where the node has one and `fast_lane`."""

    def __init__(self, nodes: NodesView, stats: StatsBook, fast_lane: bool, background: Background):
        self.nodes = nodes
        self.stats = stats
        self.fast_lane = fast_lane
        self._background = background
        self.batchers: dict[tuple[str, str], Batcher] = {}

    def batcher(self, placement: Placement, spec: DeploymentSpec) -> Batcher:
        """The placement's batcher under the deployment's batching now (one of other settings is
        drained and replaced); UNAVAILABLE for a node no longer in the view."""
        key = (placement.variant.key, placement.node.node_id)
        batcher = self.batchers.get(key)
        config = batch_config(spec, placement.variant)
        if batcher is None and not any(n.node_id == key[1] for n in self.nodes.nodes):
            raise Unavailable(f"node {key[1]} left the mesh")  # its batchers are gone with it
        if batcher is None or batcher.config != config:
            if batcher is not None:
                self._retire(batcher)
            variant = placement.variant

            def ran(rows: int, compute_ns: int) -> None:  # Triton's executions: the node calls
                self.stats.get(variant.name, variant.version).execution(rows, compute_ns)
            send = sender(self.nodes, placement.node, variant, self.fast_lane, ran)
            batcher = self.batchers[key] = Batcher(placement.variant.name, config, send,
                                                   retry_alone=about_a_request)
        return batcher

    def _retire(self, batcher: Batcher) -> None:
        self._background.spawn(batcher.drain_and_close())

    def drop_node(self, node_id: str, error: CneiError) -> None:
        """The node's batchers stop, failing what they hold with `error` (requests queued there
        fail over, batches in flight end)."""
        for key in [key for key in self.batchers if key[1] == node_id]:
            self._background.spawn(self.batchers.pop(key).close(error))
