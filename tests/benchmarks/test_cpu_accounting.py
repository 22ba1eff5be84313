"""The bench's CPU accounting: /proc counters of real processes, per request."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from bench import cpu, report

BUSY = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"


def test_a_child_is_found_under_its_parent_and_its_cpu_counted_while_it_lives():
    spin = "while True: pass"
    parent = subprocess.Popen([sys.executable, "-c",
                               f"import subprocess, sys; subprocess.run([sys.executable, '-c', {spin!r}])"])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not cpu.descendants(parent.pid):
            time.sleep(0.01)
        (child,) = cpu.descendants(parent.pid)
        before = cpu.process_seconds(child)
        time.sleep(0.5)
        assert cpu.process_seconds(child) - before >= 0.1
    finally:
        for pid in cpu.descendants(parent.pid):
            os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and cpu.process_seconds(child) > 0:
        time.sleep(0.01)  # reaped by init once its parent is gone
    assert cpu.process_seconds(child) == 0.0


def test_cpu_per_request_counts_groups_and_waited_for_children():
    book = cpu.CpuBook({"self": [os.getpid()]})
    book.start()
    subprocess.run([sys.executable, "-c", BUSY], check=True)  # a waited-for child: the "client"
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    per = book.per_request(100)
    assert per["client"] >= 0.25 / 100 * 1e6 * 0.9  # ~3,000 µs a request
    assert per["self"] >= 0.2 / 100 * 1e6 * 0.9
    assert book.per_request(0) == {}


def test_the_cpu_table_lists_measured_points_with_their_total_and_cores():
    served = [{"model": "m", "config": "coordinator", "precision": "FP32", "concurrency": 32, "infer_per_s": 2000.0,
               "cpu_us": {"client": 120.0, "door": 110.0, "coordinator": 30.0, "runtime": 340.0},
               "rows_per_execution": 9.46},
              {"model": "m", "config": "edge-direct", "precision": "FP32", "concurrency": 1, "infer_per_s": 900.0,
               "cpu_us": {"client": 150.0, "runtime": 650.0}},
              {"model": "m", "config": "mlserver-w0", "precision": "FP32", "concurrency": 32, "infer_per_s": 500.0,
               "cpu_us": {}}]
    text = report.cpu_table(served, "m")
    assert "| coordinator | FP32 | 32 | 2000 | 120 | 110 | 30 | 340 | 600 | 1.20 | 9.5 |" in text
    assert "| edge-direct | FP32 | 1 | 900 | 150 | – | – | 650 | 800 | 0.72 | – |" in text  # rows per call unmeasured
    assert "mlserver" not in text
    assert report.cpu_table(served, "other") == ""
