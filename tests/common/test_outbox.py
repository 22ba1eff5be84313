"""The on-disk outbox: events kept in order, the oldest dropped when full, and a flush's `pop`
removing only the events it delivered, whatever the outbox dropped meanwhile."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.common import events
from services.common.outbox import Outbox


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


# --- what it costs the disk, and what a crash leaves -----------------------------------------------
REPO = Path(__file__).resolve().parents[2]
io_counted = pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux's /proc/self/io")


def _written() -> int:
    """Bytes this process has passed to write() so far (its files, and anything else it writes)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["wchar"])


def _kept_bytes() -> float:
    return REGISTRY.get_sample_value("cnei_outbox_bytes")


@io_counted
def test_appending_to_a_full_outbox_writes_about_the_events_not_the_whole_file(tmp_path: Path):
    size = _line_bytes(tmp_path)
    outbox = Outbox(tmp_path / "outbox.jsonl", max_bytes=100 * size)
    _put(outbox, *["old"] * 100)  # full: each next event drops the oldest
    before = _written()
    _put(outbox, *["new"] * 300)
    assert _written() - before < 5 * 300 * size  # the events, a head record each, their copies when the front is cut
    assert _names(Outbox(tmp_path / "outbox.jsonl"))[-3:] == ["new"] * 3


@io_counted
def test_flushing_a_full_outbox_writes_less_than_its_file(tmp_path: Path):
    outbox = Outbox(tmp_path / "outbox.jsonl")
    _put(outbox, *[f"e{i}" for i in range(2000)])
    size, before = outbox.path.stat().st_size, _written()
    while batch := outbox.peek(100):
        outbox.pop(through=batch[-1].seq)
    assert _written() - before < size and _names(Outbox(tmp_path / "outbox.jsonl")) == []


def test_the_file_of_a_full_outbox_stays_under_one_and_a_half_times_its_byte_bound(tmp_path: Path):
    size = _line_bytes(tmp_path)
    outbox = Outbox(tmp_path / "outbox.jsonl", max_bytes=20 * size)
    largest = 0
    for i in range(100):
        _put(outbox, f"e{i}")
        largest = max(largest, outbox.path.stat().st_size)
    assert largest <= 1.5 * outbox.max_bytes and _kept_bytes() <= outbox.max_bytes
    assert _names(Outbox(tmp_path / "outbox.jsonl")) == [f"e{i}" for i in range(81, 100)]


def _crash_after(path: Path, code: str) -> None:
    """Run `code` (with `outbox`, `put` and `pop` at hand) in a process killed by SIGKILL right after."""
    script = f"""
import os, signal
from services.common import events
from services.common.outbox import Outbox
outbox = Outbox({str(path)!r}, max_events=4)
def put(*names):
    for name in names:
        outbox.put(events.MODEL_LOADED, events.Envelope(type=events.MODEL_LOADED, source="s", payload={{"name": name}}))
def pop(count):
    outbox.pop(through=outbox.peek(count)[-1].seq)
{code}
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


@pytest.mark.parametrize("code, kept", [
    ("put('a', 'b', 'c', 'd'); pop(1)", ["b", "c", "d"]),  # the popped front stays in the file
    ("put('a', 'b', 'c', 'd'); pop(3)", ["d"]),  # cut away
    ("put('a', 'b', 'c', 'd', 'e', 'f')", ["c", "d", "e", "f"]),  # a and b dropped
    ("put('a', 'b', 'c', 'd'); batch = outbox.peek(2); put('e', 'f', 'g'); "
     "outbox.pop(through=batch[-1].seq)", ["d", "e", "f", "g"]),  # a, b, c dropped while a flush ran
    ("put('a', 'b', 'c'); pop(1); put('d'); pop(1); put('e')", ["c", "d", "e"]),
])
def test_a_process_killed_between_operations_leaves_the_kept_events_and_no_popped_one(
        tmp_path: Path, code: str, kept: list[str]):
    _crash_after(tmp_path / "outbox.jsonl", code)
    assert _names(Outbox(tmp_path / "outbox.jsonl")) == kept


def test_a_process_killed_while_it_cut_the_front_away_loses_no_kept_event(tmp_path: Path):
    outbox = Outbox(tmp_path / "outbox.jsonl")
    _put(outbox, "a", "b", "c", "d", "e", "f")
    outbox.pop(through=outbox.peek(1)[-1].seq)
    head = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "outbox.jsonl"}
    outbox.pop(through=outbox.peek(3)[-1].seq)  # past half the file: cut away, the kept ones renamed over it
    for name, data in head.items():  # killed before the head offset of the old file was removed
        (tmp_path / name).write_bytes(data)
    assert _names(Outbox(tmp_path / "outbox.jsonl")) == ["e", "f"]


def test_a_torn_last_line_is_skipped_with_a_warning_and_the_next_event_kept(tmp_path: Path, caplog):
    _put(Outbox(tmp_path / "outbox.jsonl"), "a", "b")
    with (tmp_path / "outbox.jsonl").open("a") as fh:
        fh.write('{"subject":"cnei.model.loaded","envelope":{"ty')  # killed while it was appended
    outbox = Outbox(tmp_path / "outbox.jsonl")
    assert _names(outbox) == ["a", "b"] and "torn last line" in caplog.text
    _put(outbox, "c")
    assert _names(Outbox(tmp_path / "outbox.jsonl")) == ["a", "b", "c"]


def test_a_file_the_previous_format_wrote_opens_with_its_events_in_order(tmp_path: Path):
    lines = [json.dumps({"subject": events.MODEL_LOADED, "envelope": asdict(events.Envelope(
        type=events.MODEL_LOADED, source="s", payload={"name": name}))}, separators=(",", ":")) for name in "abc"]
    (tmp_path / "outbox.jsonl").write_text("".join(line + "\n" for line in lines))
    outbox = Outbox(tmp_path / "outbox.jsonl")
    assert _names(outbox) == ["a", "b", "c"]
    outbox.pop(through=outbox.peek(1)[-1].seq)
    _put(outbox, "d")
    assert _names(Outbox(tmp_path / "outbox.jsonl")) == ["b", "c", "d"]


def test_an_unreadable_head_offset_gives_every_event_in_the_file_again_rather_than_lose_one(tmp_path: Path):
    outbox = Outbox(tmp_path / "outbox.jsonl")
    _put(outbox, "a", "b", "c")
    outbox.pop(through=outbox.peek(1)[-1].seq)
    for path in tmp_path.iterdir():
        if path.name != "outbox.jsonl":
            path.write_bytes(b"\0garbage")
    assert _names(Outbox(tmp_path / "outbox.jsonl"))[-2:] == ["b", "c"]


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


# --- what a full outbox logs -----------------------------------------------------------------------
class Clock:
    """A clock the test moves: `now` seconds."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _error_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "services.common.outbox" and r.levelname == "ERROR"]


def test_a_full_outbox_logs_its_first_drop_at_once_then_one_summary_a_minute_and_counts_every_drop(
        tmp_path: Path, caplog):
    clock, dropped = Clock(), _dropped()
    outbox = Outbox(tmp_path / "outbox.jsonl", max_events=2, clock=clock)
    _put(outbox, "a", "b")
    with caplog.at_level("ERROR", logger="services.common.outbox"):
        for second in range(0, 150, 5):  # a snapshot every 5 s for 150 s, NATS away
            clock.now = 1000.0 + second
            _put(outbox, f"s{second}")
    lines = _error_lines(caplog)
    assert len(lines) == 3 and _dropped() == dropped + 30
    assert "outbox full" in lines[0] and "dropping 1 oldest events" in lines[0]
    assert lines[1:] == ["outbox still full: dropped 12 events in the last 60 s, 13 in all since it filled",
                         "outbox still full: dropped 12 events in the last 60 s, 25 in all since it filled"]


def test_an_outbox_with_room_again_sums_up_the_drops_and_logs_the_next_fill_s_first_drop_at_once(
        tmp_path: Path, caplog):
    clock = Clock()
    outbox = Outbox(tmp_path / "outbox.jsonl", max_events=2, clock=clock)
    with caplog.at_level("WARNING", logger="services.common.outbox"):
        _put(outbox, "a", "b", "c", "d", "e")  # 3 dropped: the first logged, 2 not yet
        clock.now += 10
        outbox.pop(through=outbox.peek()[-1].seq)  # NATS back: delivered
        _put(outbox, "f", "g", "h")  # full again: its first drop logged at once
    messages = [r.getMessage() for r in caplog.records if r.name == "services.common.outbox"]
    assert len(messages) == 3 and "dropping 1 oldest events" in messages[0] and "dropping 1" in messages[2]
    assert messages[1] == ("outbox has room again (events delivered): 3 events dropped while it was full, "
                           "2 of them since the last line 10 s ago")


def test_events_over_the_byte_bound_are_logged_at_once_then_summed_up_a_minute_at_a_time(tmp_path: Path, caplog):
    clock, size, dropped = Clock(), _line_bytes(tmp_path), _dropped()
    outbox = Outbox(tmp_path / "outbox.jsonl", max_bytes=2 * size, clock=clock)
    with caplog.at_level("ERROR", logger="services.common.outbox"):
        for second in range(0, 70, 5):
            clock.now = 1000.0 + second
            _put(outbox, "x" * 3 * size)
    lines = _error_lines(caplog)
    assert len(lines) == 2 and _dropped() == dropped + 14
    assert "over the outbox's bound" in lines[0]
    assert lines[1] == (f"outbox: dropped 12 events over its bound of {2 * size} bytes in the last 60 s, "
                        "13 in all")
