"""The on-disk outbox: events kept in order, the oldest dropped when full, and a flush's `pop`
removing only the events it delivered, whatever the outbox dropped meanwhile."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from prometheus_client import REGISTRY

from services.common import events
from services.common.outbox import Outbox

REPO = Path(__file__).resolve().parents[2]


def _put(outbox: Outbox, *names: str) -> None:
    for name in names:
        outbox.put(events.MODEL_LOADED, events.Envelope(type=events.MODEL_LOADED, source="s", payload={"name": name}))


def _names(outbox: Outbox) -> list[str]:
    return [entry.envelope.payload["name"] for entry in outbox.peek()]


def test_events_come_back_in_order_from_the_file(tmp_path: Path):
    _put(Outbox(tmp_path / "outbox.jsonl"), "a", "b", "c")
    reopened = Outbox(tmp_path / "outbox.jsonl")
    assert _names(reopened) == ["a", "b", "c"]
    assert [entry.subject for entry in reopened.peek()] == [events.MODEL_LOADED] * 3


def test_a_full_outbox_drops_its_oldest_events(tmp_path: Path):
    outbox = Outbox(tmp_path / "outbox.jsonl", max_events=2)
    _put(outbox, "a", "b", "c")
    assert _names(outbox) == ["b", "c"] and _names(Outbox(tmp_path / "outbox.jsonl")) == ["b", "c"]


def test_pop_removes_the_delivered_events_only(tmp_path: Path):
    outbox = Outbox(tmp_path / "outbox.jsonl")
    _put(outbox, "a", "b", "c")
    outbox.pop(through=outbox.peek(2)[-1].seq)
    assert _names(outbox) == ["c"] and _names(Outbox(tmp_path / "outbox.jsonl")) == ["c"]


def test_events_kept_while_a_flush_of_a_full_outbox_runs_survive_its_pop(tmp_path: Path):
    outbox = Outbox(tmp_path / "outbox.jsonl", max_events=3)
    _put(outbox, "a", "b", "c")
    batch = outbox.peek()  # being sent
    _put(outbox, "d", "e")  # meanwhile: a and b dropped
    outbox.pop(through=batch[-1].seq)
    assert _names(outbox) == ["d", "e"] and _names(Outbox(tmp_path / "outbox.jsonl")) == ["d", "e"]


def test_a_pop_of_events_all_dropped_meanwhile_removes_nothing(tmp_path: Path):
    outbox = Outbox(tmp_path / "outbox.jsonl", max_events=2)
    _put(outbox, "a")
    batch = outbox.peek()
    _put(outbox, "b", "c")  # a dropped
    outbox.pop(through=batch[-1].seq)
    assert _names(outbox) == ["b", "c"]


def _line_bytes(tmp_path: Path) -> int:
    """Bytes one `_put` event takes in the file (one-letter names: within a few bytes, its time's digits)."""
    probe = Outbox(tmp_path / "probe.jsonl")
    _put(probe, "x")
    return probe.path.stat().st_size


def _dropped() -> float:
    return REGISTRY.get_sample_value("cnei_outbox_dropped_total")


def test_an_outbox_over_its_byte_bound_drops_its_oldest_events_and_counts_them(tmp_path: Path):
    size, dropped = _line_bytes(tmp_path), _dropped()
    outbox = Outbox(tmp_path / "outbox.jsonl", max_bytes=2 * size + size // 2)  # two events fit
    _put(outbox, "a", "b", "c", "d")
    assert _names(outbox) == ["c", "d"] and _names(Outbox(tmp_path / "outbox.jsonl")) == ["c", "d"]
    assert outbox.path.stat().st_size <= outbox.max_bytes and _dropped() == dropped + 2
    assert REGISTRY.get_sample_value("cnei_outbox_bytes") == outbox.path.stat().st_size


def test_an_event_larger_than_the_byte_bound_alone_is_dropped_and_the_kept_ones_stay(tmp_path: Path):
    size, dropped = _line_bytes(tmp_path), _dropped()
    outbox = Outbox(tmp_path / "outbox.jsonl", max_bytes=2 * size)
    _put(outbox, "a")
    _put(outbox, "x" * 3 * size)
    assert _names(outbox) == ["a"] and _names(Outbox(tmp_path / "outbox.jsonl")) == ["a"]
    assert _dropped() == dropped + 1


def test_a_file_a_larger_bound_left_is_cut_to_the_bound_when_opened(tmp_path: Path):
    size = _line_bytes(tmp_path)
    _put(Outbox(tmp_path / "outbox.jsonl"), "a", "b", "c")
    outbox = Outbox(tmp_path / "outbox.jsonl", max_bytes=size + size // 2)  # one event fits
    assert _names(outbox) == ["c"] and outbox.path.stat().st_size <= outbox.max_bytes
    _put(outbox, "d")
    assert _names(Outbox(tmp_path / "outbox.jsonl")) == ["d"]


def test_outboxes_side_by_side_as_a_coordinator_s_workers_name_them_keep_their_own_events(tmp_path: Path):
    script = """
import sys
from services.common import events
from services.common.outbox import Outbox
outbox = Outbox(sys.argv[1])
for name in [*range(1500), "last"]:
    outbox.put(events.MODEL_LOADED, events.Envelope(type=events.MODEL_LOADED, source="s", payload={"name": name}))
    if name != "last":  # sent: the file rewritten through a temporary file of its own
        outbox.pop(through=outbox.peek(1)[-1].seq)
"""
    paths = [tmp_path / f"outbox.jsonl.{index}" for index in range(2)]  # <outbox_path>.<worker index>
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=REPO, stderr=subprocess.PIPE, text=True)
             for path in paths]
    assert [(proc.wait(timeout=60), proc.stderr.read()) for proc in procs] == [(0, "")] * 2
    assert [_names(Outbox(path)) for path in paths] == [["last"], ["last"]]
