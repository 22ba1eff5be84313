"""The front door's batch formation (frontdoor/src/formation.cc), run by a small driver on given
queues: which batch leaves and when, by max batch size, queue delay, preferred sizes, priorities,
keys (shapes never mixed) and the byte cap; and every decision the same as the coordinator's
batcher (services/common/batcher.py) makes on the same queue."""
from __future__ import annotations

import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.common.batch_formation import BatchConfig, Pending, batch_ready, form_batch, may_overlap
from services.common.batcher import DEFAULT_PRIORITY_LEVEL

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ROOT / "services" / "coordinator" / "frontdoor" / "src"
DRIVER = Path(__file__).with_name("door_formation_driver.cc")
NO_CAP = 1 << 40  # a byte cap no queue here reaches
DELAY_US = 1_000_000

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler for the door's sources")


@dataclass(frozen=True)
class Req:
    rows: int = 1
    key: str = "a"
    priority: int = DEFAULT_PRIORITY_LEVEL
    received_us: int = 0
    bytes: int = 4


@dataclass(frozen=True)
class Case:
    queue: tuple[Req, ...]
    max_batch_size: int = 8
    delay_us: int = DELAY_US
    preferred: tuple[int, ...] = ()
    now_us: int = 10
    last_rows: int = 0
    max_bytes: int = NO_CAP

    def line(self) -> str:
        head = [self.max_batch_size, self.delay_us, self.max_bytes, self.last_rows, self.now_us,
                len(self.preferred), *self.preferred, len(self.queue)]
        queued = [f"{r.received_us} {r.priority} {r.key} {r.rows} {r.bytes}" for r in self.queue]
        return " ".join([*map(str, head), *queued])


@dataclass(frozen=True)
class Decision:
    ready: bool
    wake_us: int  # -1: not needed for the decision
    may_overlap: bool
    rows: int
    taken: tuple[int, ...]  # queue indices, in batch order


@pytest.fixture(scope="module")
def decide(tmp_path_factory):
    binary = tmp_path_factory.mktemp("formation") / "driver"
    subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{SOURCES}", "-o", str(binary),
                    str(DRIVER), str(SOURCES / "formation.cc")], check=True)

    def run(cases: list[Case]) -> list[Decision]:
        out = subprocess.run([str(binary)], input="".join(c.line() + "\n" for c in cases), capture_output=True,
                             text=True, check=True, timeout=60).stdout.split("\n")
        decisions = []
        for line in out[:len(cases)]:
            ready, wake, overlap, rows, _, *taken = map(int, line.split())
            decisions.append(Decision(bool(ready), wake, bool(overlap), rows, tuple(taken)))
        return decisions
    return run


def queue_of(*reqs: Req) -> tuple[Req, ...]:
    """Requests arriving 1 µs apart, in the order given."""
    return tuple(Req(r.rows, r.key, r.priority, i, r.bytes) for i, r in enumerate(reqs))


A1, A2, A3, B1, B2, B4 = Req(1, "a"), Req(2, "a"), Req(3, "a"), Req(1, "b"), Req(2, "b"), Req(4, "b")


def test_a_preferred_size_is_made_of_the_head_s_key_alone_in_a_queue_of_mixed_shapes(decide):
    (decision,) = decide([Case(queue_of(A2, B2, A1, B2, A1), preferred=(4,))])
    assert (decision.ready, decision.taken, decision.rows) == (True, (0, 2, 4), 4)


def test_a_preferred_size_only_another_key_makes_holds_the_batch_until_the_oldest_has_waited(decide):
    queue = queue_of(A1, B2, B2)
    held, sent = decide([Case(queue, preferred=(4,)), Case(queue, preferred=(4,), now_us=DELAY_US)])
    assert (held.ready, held.wake_us) == (False, DELAY_US)
    assert (sent.ready, sent.taken, sent.rows) == (True, (0,), 1)


@pytest.mark.parametrize(("queue", "taken", "rows"), [
    (queue_of(A3, A3), (0, 1), 6),  # no fill under 4 makes 4: the full batch
    (queue_of(A2, A3, A2), (0, 2), 4),  # 2 + 2 make 4 exactly: that batch, the 3 stays
])
def test_rows_past_every_preferred_size_leave_at_once_as_the_largest_exact_preferred_batch_or_full(
        decide, queue, taken, rows):
    (decision,) = decide([Case(queue, max_batch_size=64, preferred=(4,))])
    assert (decision.ready, decision.taken, decision.rows) == (True, taken, rows)


@pytest.mark.parametrize(("queue", "ready", "taken", "rows"), [
    (queue_of(A3, A1, A1, A3), True, (0, 1, 2, 3), 8),
    (queue_of(A3, A1, A1), True, (0, 1), 4),
    (queue_of(A1, A1), True, (0, 1), 2),
    (queue_of(A1, A2), False, (0, 1), 3),  # no size made exactly: held; once taken, the full batch
    (queue_of(A3), False, (0,), 3),
])
def test_preferred_sizes_are_tried_largest_first_in_whatever_order_they_are_listed(decide, queue, ready, taken, rows):
    (decision,) = decide([Case(queue, max_batch_size=16, preferred=(2, 8, 4, 4, 32))])
    assert (decision.ready, decision.taken, decision.rows) == (ready, taken, rows)


def test_a_preferred_size_above_max_batch_size_is_never_formed(decide):
    short, full = decide([Case(queue_of(A1, A2), max_batch_size=4, preferred=(6,)),
                          Case(queue_of(A2, A1, A2), max_batch_size=4, preferred=(6,))])
    assert short.ready is False  # 3 rows: neither full nor past a preferred size within 4
    assert (full.ready, full.taken, full.rows) == (True, (0, 1), 3)


def test_the_most_urgent_level_leads_the_batch_then_its_key_in_level_and_arrival_order(decide):
    queue = queue_of(A1, B1, Req(1, "a", priority=1), Req(1, "b", priority=2), Req(1, "a", priority=1))
    (decision,) = decide([Case(queue, delay_us=0)])
    assert (decision.ready, decision.taken, decision.rows) == (True, (2, 4, 0), 3)


@pytest.mark.parametrize(("preferred", "taken", "rows"), [((), (0, 2), 2), ((2,), (0, 2), 2)])
def test_the_byte_cap_leaves_out_a_request_that_would_pass_it_and_takes_later_smaller_ones(
        decide, preferred, taken, rows):
    queue = queue_of(Req(1, bytes=60), Req(1, bytes=50), Req(1, bytes=40))
    (decision,) = decide([Case(queue, delay_us=0 if not preferred else DELAY_US, preferred=preferred, max_bytes=100)])
    assert (decision.ready, decision.taken, decision.rows) == (True, taken, rows)


def test_without_a_batch_dimension_each_request_leaves_alone_most_urgent_first(decide):
    (decision,) = decide([Case(queue_of(A1, Req(1, "b", priority=1)), max_batch_size=0, last_rows=5)])
    assert (decision.ready, decision.may_overlap, decision.taken, decision.rows) == (True, True, (1,), 1)


@pytest.mark.parametrize(("now_us", "ready"), [(DELAY_US - 1, False), (DELAY_US, True)])
def test_the_queue_delay_counts_from_the_oldest_request_and_ends_exactly_then(decide, now_us, ready):
    (decision,) = decide([Case(queue_of(A1, A1), now_us=now_us)])
    assert (decision.ready, decision.taken) == (ready, (0, 1))


@pytest.mark.parametrize(("queue", "last_rows", "overlap"), [
    (queue_of(A1, B4), 3, False),  # the head's key has 1 row of the 3 in flight
    (queue_of(A1, B4, A2), 3, True),
    (queue_of(Req(8, "a")), 100, True),  # a full batch goes whatever was sent last
])
def test_a_second_batch_overlaps_only_once_the_head_s_rows_are_as_many_as_the_last_batch(
        decide, queue, last_rows, overlap):
    (decision,) = decide([Case(queue, last_rows=last_rows)])
    assert decision.may_overlap is overlap


def _random_case(rng: random.Random) -> Case:
    max_batch_size = rng.randint(1, 16)
    delay_us = rng.choice([0, 1_000, 500_000])
    keys = rng.choice(["a", "ab", "abc"])
    queue = tuple(Req(rng.randint(1, min(max_batch_size, 5)), rng.choice(keys),
                      rng.choice([1, 2, DEFAULT_PRIORITY_LEVEL]), 100 * i + rng.randint(0, 99))
                  for i in range(rng.randint(1, 12)))
    now_us = queue[-1].received_us + rng.choice([0, 10, delay_us // 2, delay_us + 1, 2 * delay_us])
    if now_us - queue[0].received_us == delay_us:  # an exact boundary is a float comparison in Python
        now_us += 1
    preferred = tuple(rng.sample(range(1, max_batch_size + 3), rng.randint(0, 3)))
    return Case(queue, max_batch_size, delay_us, preferred, now_us, last_rows=rng.randint(1, 20))


def _reference(case: Case) -> Decision:
    pending = [Pending(inputs={}, size=r.rows, signature=r.key, priority=r.priority, enqueued=r.received_us / 1e6)
               for r in case.queue]
    config = BatchConfig(max_batch_size=case.max_batch_size, max_queue_delay_us=case.delay_us,
                         preferred_batch_sizes=case.preferred)
    now = case.now_us / 1e6
    batch, _ = form_batch(pending, config, now)
    return Decision(batch_ready(pending, config, now), -1, may_overlap(pending, case.last_rows, case.max_batch_size),
                    sum(p.size for p in batch), tuple(pending.index(p) for p in batch))


@pytest.mark.parametrize("seed", range(8))
def test_every_decision_is_the_coordinator_batcher_s_on_the_same_queue(decide, seed):
    rng = random.Random(seed)
    cases = [_random_case(rng) for _ in range(250)]
    for case, decision in zip(cases, decide(cases), strict=True):
        expected = _reference(case)
        assert (decision.ready, decision.may_overlap, decision.taken, decision.rows) == (
            expected.ready, expected.may_overlap, expected.taken, expected.rows), case
