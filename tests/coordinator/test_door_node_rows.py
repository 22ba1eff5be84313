"""The front door's rows per node (frontdoor/src/node_rows.cc), run by a small driver: the rows
every route's batcher has queued for a node or sent it add up at that node, as the coordinator's
own outstanding rows do across models; rows let go of leave it; a batcher that ends still holding
rows gives them back, counted as a counting error; and batchers changing them on threads of their
own, while a pick reads them, leave exactly what they hold."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ROOT / "services" / "coordinator" / "frontdoor" / "src"
DRIVER = Path(__file__).with_name("door_node_rows_driver.cc")

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler for the door's sources")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    binary = tmp_path_factory.mktemp("node-rows") / "driver"
    subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-pthread", f"-I{SOURCES}",
                    "-o", str(binary), str(DRIVER), str(SOURCES / "node_rows.cc")], check=True)

    def steps(*lines: str) -> list[str]:
        out = subprocess.run([str(binary)], input="".join(f"{line}\n" for line in lines), capture_output=True,
                             text=True, check=True, timeout=120)
        return out.stdout.splitlines()
    return steps


@pytest.mark.parametrize(("steps", "shown"), [
    # model A's route and model B's route to node 1: one count, both models' rows
    (("hold a1 node-1", "hold b1 node-1", "add a1 7", "add b1 2"), "node-1=9/0"),
    (("hold a1 node-1", "hold a2 node-2", "add a1 7", "add a2 3"), "node-1=7/0 node-2=3/0"),
    # queued, then some sent, answered, dropped (cancelled, expired), handed over: back to 0
    (("hold a1 node-1", "add a1 5", "add a1 4", "add a1 -4", "add a1 -3", "add a1 -2"), "node-1=0/0"),
    # a node once counted stays listed at 0: a report says its rows went
    (("hold a1 node-1", "add a1 3", "add a1 -3", "hold b1 node-2", "add b1 1"), "node-1=0/0 node-2=1/0"),
    # a batcher that ends holding none gives nothing back
    (("hold a1 node-1", "add a1 3", "add a1 -3", "end a1"), "node-1=0/0"),
])
def test_rows_of_every_route_to_a_node_add_up_there_and_leave_with_their_requests(run, steps, shown):
    assert run(*steps, "show") == [shown]


@pytest.mark.parametrize(("steps", "shown"), [
    (("hold a1 node-1", "hold b1 node-1", "add a1 6", "add b1 2", "end a1"), "node-1=2/6"),
    (("hold a1 node-1", "add a1 6", "end a1", "hold a1 node-1", "add a1 1"), "node-1=1/6"),
])
def test_a_batcher_that_ends_holding_rows_gives_them_back_and_they_are_counted_as_an_error(run, steps, shown):
    assert run(*steps, "show") == [shown]


def test_a_node_no_route_has_counted_rows_at_is_not_listed(run):
    assert run("show") == [""]


@pytest.mark.parametrize("threads", [2, 9])
def test_batchers_on_threads_of_their_own_leave_exactly_the_rows_they_hold(run, threads):
    nodes = ["n0", "n1", "n2"]  # the reader looks at all three
    holding = " ".join(f"{node}={sum(1 for i in range(threads) if i % 3 == n)}/0" for n, node in enumerate(nodes))
    let_go = [f"add race{i} -1" for i in range(threads)]
    assert run(f"race {threads} 200000", "show", *let_go, "show") == [holding, " ".join(f"{n}=0/0" for n in nodes)]
