"""The front door's least_loaded rule (frontdoor/src/least_loaded.cc), run by a small driver on
given nodes: the fewest requests in flight (the node's heartbeat) plus rows outstanding per CPU,
then the lowest CPU load, then the smallest node id; and every pick the same as the full path's
(services/coordinator/placement.py, least_loaded) on the same nodes."""
from __future__ import annotations

import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.common.nodes import NodeInfo
from services.coordinator.placement import least_loaded

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ROOT / "services" / "coordinator" / "frontdoor" / "src"
DRIVER = Path(__file__).with_name("door_least_loaded_driver.cc")

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler for the door's sources")


@dataclass(frozen=True)
class Node:
    node_id: str
    inflight: int = 0  # the heartbeat's requests in flight
    outstanding: int = 0  # rows the door (or the coordinator) has queued for it or sent it
    cpus: int = 4
    cpu_load: float = 0.0

    def line(self) -> str:
        return f"{self.node_id} {self.inflight} {self.outstanding} {self.cpus} {self.cpu_load!r}"


@pytest.fixture(scope="module")
def pick(tmp_path_factory):
    binary = tmp_path_factory.mktemp("least-loaded") / "driver"
    subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{SOURCES}", "-o", str(binary),
                    str(DRIVER), str(SOURCES / "least_loaded.cc")], check=True)

    def run(cases: list[tuple[Node, ...]]) -> list[int]:
        lines = "".join(f"{len(nodes)} {' '.join(n.line() for n in nodes)}\n" for nodes in cases)
        out = subprocess.run([str(binary)], input=lines, capture_output=True, text=True, check=True, timeout=60)
        return [int(index) for index in out.stdout.split()]
    return run


def full_path(nodes: tuple[Node, ...]) -> int:
    """The index of the node the coordinator's own least_loaded picks."""
    infos = [NodeInfo(n.node_id, "edge", "r1", "127.0.0.1:1", cpus=n.cpus, inflight=n.inflight, cpu_load=n.cpu_load)
             for n in nodes]
    chosen = least_loaded(infos, {n.node_id: n.outstanding for n in nodes})
    return [n.node_id for n in nodes].index(chosen.node_id)


@pytest.mark.parametrize(("nodes", "expected"), [
    ((Node("a", outstanding=3, cpus=4), Node("b", outstanding=4, cpus=8)), 1),  # per CPU: 0.75 against 0.5
    ((Node("a", inflight=5), Node("b", outstanding=2)), 1),  # the heartbeat's in flight count too
    ((Node("a", inflight=1, outstanding=1), Node("b", outstanding=3)), 0),  # ... beside the rows outstanding
    ((Node("a", cpu_load=0.5), Node("b", cpu_load=0.25)), 1),  # a tie: the lower CPU load
    ((Node("b"), Node("a"), Node("c")), 1),  # a tie of both: the smallest node id, wherever listed
    ((Node("a", outstanding=2, cpus=0), Node("b", outstanding=3, cpus=1)), 0),  # no CPUs said: one
], ids=["per-cpu", "heartbeat", "heartbeat-and-rows", "cpu-load", "node-id", "zero-cpus"])
def test_the_door_picks_the_least_loaded_node_as_the_full_path_does(pick, nodes, expected):
    assert pick([nodes]) == [expected] == [full_path(nodes)]


def _random_case(rng: random.Random) -> tuple[Node, ...]:
    """Small numbers, so that loads and CPU loads often tie."""
    ids = rng.sample(["edge-a1", "edge-a2", "edge-b1", "cloud-1", "n", "n2"], rng.randint(1, 5))
    return tuple(Node(node_id, rng.randint(0, 4), rng.randint(0, 6), rng.choice([0, 1, 2, 3, 4, 8]),
                      rng.choice([0.0, 0.1 + 0.2, 0.3, 0.25, 1.0])) for node_id in ids)


def test_every_pick_of_the_door_is_the_full_paths_on_random_nodes(pick):
    rng = random.Random(7)
    cases = [_random_case(rng) for _ in range(2000)]
    assert pick(cases) == [full_path(nodes) for nodes in cases]
