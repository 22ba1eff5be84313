"""Which live nodes take part in a round: a pure, seeded choice."""
from __future__ import annotations

import math
import random

from services.common.nodes import NodeInfo


def select_clients(nodes: list[NodeInfo], tier: str, fraction: float, min_clients: int,
                   seed: int) -> list[NodeInfo]:
    """ceil(fraction · n) of the live `tier` nodes, at least min_clients (when there are that
    many), chosen with a seeded RNG so a job's rounds are reproducible; sorted by node id."""
    eligible = sorted((n for n in nodes if n.tier == tier), key=lambda n: n.node_id)
    wanted = min(len(eligible), max(min_clients, math.ceil(fraction * len(eligible))))
    chosen = random.Random(seed).sample(eligible, wanted)
    return sorted(chosen, key=lambda n: n.node_id)


def next_version(versions: list[str]) -> str:
    """One more than the highest numeric version (\"1\" when there is none)."""
    numbers = [int(v) for v in versions if v.isdigit()]
    return str(max(numbers, default=0) + 1)
