"""Node choice for a request: pure functions over node records and local load counts."""
from __future__ import annotations

from collections.abc import Collection, Mapping

from services.common.nodes import NodeInfo


def candidates(nodes: list[NodeInfo], exclude: Collection[str] = ()) -> list[NodeInfo]:
    """Live nodes not already tried for this request."""
    return [n for n in nodes if n.node_id not in exclude]


def least_outstanding(
    nodes: list[NodeInfo], variant_key: str, outstanding: Mapping[str, int],
    exclude: Collection[str] = (),
) -> NodeInfo | None:
    """Fewest requests in flight from this coordinator; warm nodes (model loaded) win ties,
    then edge before cloud, then node id for determinism."""
    pool = candidates(nodes, exclude)
    if not pool:
        return None
    return min(pool, key=lambda n: (
        outstanding.get(n.node_id, 0),
        variant_key not in n.models,
        n.tier != "edge",
        n.node_id,
    ))
