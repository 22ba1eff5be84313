"""The compiled front door as the coordinator's child: its stderr lines are logged through Python
logging (the coordinator's log stays JSON lines), at WARNING when they tell of a failure, none
lost, and the reading ends when the door exits."""
from __future__ import annotations

import logging
import socket
import sys
import time

import pytest

from services.cli import infra
from services.coordinator.door_process import BUILT, DoorProcess, door_line_level
from tests.coordinator.coordinator_process import run_and_stop

needs_door = pytest.mark.skipif(not BUILT.is_file(), reason=f"front door not built ({BUILT}): make frontdoor")
DOOR_LOGGER = "services.coordinator.frontdoor"


@pytest.mark.parametrize(("line", "level"), [
    ("cnei-frontdoor listening on 127.0.0.1:8001 backend 127.0.0.1:9001", logging.INFO),
    ("cnei-frontdoor: model 'digits' takes the coordinator's path: a split route did not parse", logging.INFO),
    ("cnei-frontdoor: signal 15, draining", logging.INFO),
    ("cnei-frontdoor: Route failed, retrying in 1 s: connection refused", logging.WARNING),
    ("cnei-frontdoor: route 3 to edge-a1 failed (UNAVAILABLE); 4 requests go to the coordinator", logging.WARNING),
    ("cnei-frontdoor: cannot listen on 127.0.0.1:8001", logging.WARNING),
    ("cnei-frontdoor: last report dropped: Deadline Exceeded", logging.WARNING),
    ("E1127 10:28:00.123456   4242 chttp2_transport.cc:1] an error", logging.WARNING),
    ("W0000 00:00:1732700000.1   4242 ssl_utils.cc:1] slow", logging.WARNING),
    ("I0000 00:00:1732700000.1   4242 config.cc:1] ready", logging.INFO),
])
def test_a_door_line_is_logged_at_warning_when_it_tells_of_a_failure(line, level):
    assert door_line_level(line) == level


def door_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == DOOR_LOGGER]


def wait_for_line(caplog, text: str, timeout: float = 15.0) -> logging.LogRecord:
    return infra.wait_until(lambda: next((r for r in door_records(caplog) if text in r.getMessage()), None),
                            timeout, f"the door's line {text!r} in the log")


@needs_door
async def test_the_doors_stderr_is_logged_line_by_line_until_it_stops(caplog, capfd):
    caplog.set_level(logging.INFO, logger=DOOR_LOGGER)
    port = infra.free_port()
    door = DoorProcess(BUILT, f"127.0.0.1:{port}", f"127.0.0.1:{infra.free_port()}", 100)
    door.start()
    try:
        listening = wait_for_line(caplog, "cnei-frontdoor listening on")
        assert listening.levelno == logging.INFO
        assert f"127.0.0.1:{port}" in listening.getMessage()
    finally:
        await door.stop()
    draining = wait_for_line(caplog, "cnei-frontdoor: signal 15, draining", timeout=1)
    assert draining.levelno == logging.INFO
    assert not any(reader.is_alive() for reader in door.readers)  # the door's stderr closed: its reader ended
    assert "cnei-frontdoor" not in capfd.readouterr().err  # nothing written past the logging


@needs_door
async def test_a_door_that_cannot_start_is_logged_as_a_warning_and_its_reader_ends(caplog):
    caplog.set_level(logging.INFO, logger=DOOR_LOGGER)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        door = DoorProcess(BUILT, f"127.0.0.1:{taken.getsockname()[1]}", f"127.0.0.1:{infra.free_port()}", 100)
        door.start()
        try:
            assert door.proc.wait(15) != 0
        finally:
            await door.stop()
    refused = wait_for_line(caplog, "cnei-frontdoor: cannot listen on", timeout=1)
    assert refused.levelno == logging.WARNING
    assert not any(reader.is_alive() for reader in door.readers)


def test_a_door_writing_more_than_a_pipe_holds_loses_no_line(caplog, tmp_path):
    """A chatty door (here a stand-in writing 5,000 lines at once) is never held up by a full
    pipe, and every line arrives, in order, before its reader ends."""
    caplog.set_level(logging.INFO, logger=DOOR_LOGGER)
    chatty = tmp_path / "chatty-door"
    chatty.write_text(f"#!{sys.executable}\nimport sys\n"
                      "for i in range(5000):\n    print(f'cnei-frontdoor: line {i} ' + 'x' * 100, file=sys.stderr)\n")
    chatty.chmod(0o755)
    door = DoorProcess(chatty, "127.0.0.1:1", "127.0.0.1:2", 100)
    started = time.monotonic()
    door.start()
    assert door.proc.wait(15) == 0
    door.join_readers()
    assert time.monotonic() - started < 15
    lines = [r.getMessage() for r in door_records(caplog)]
    assert lines == [f"cnei-frontdoor: line {i} " + "x" * 100 for i in range(5000)]
    assert not any(reader.is_alive() for reader in door.readers)



@needs_door
def test_a_coordinator_behind_its_door_logs_json_lines_only(nats_server, redis_server, tmp_path):
    """The coordinator process with its door, started and stopped: every line of its stderr is a
    JSON record, the door's among them under their own logger."""
    records = run_and_stop(nats_server, redis_server, tmp_path / "coordinator.log", b"cnei-frontdoor listening on",
                           CNEI_COORDINATOR_FRONT_DOOR="on")
    door_lines = {r["msg"].split(" on ")[0]: r for r in records if r["logger"] == DOOR_LOGGER}
    assert set(door_lines) >= {"cnei-frontdoor listening", "cnei-frontdoor: signal 15, draining"}
    assert all(r["level"] == "INFO" for r in door_lines.values())
