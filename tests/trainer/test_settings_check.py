"""A trainer with a setting out of range refuses to start, naming the variable (a negative
CNEI_TRAINER_ROUND_RETRIES started, then failed every job whose round fell short with
"unreachable"). A real `python -m services.trainer` process."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("ROUND_RETRIES", "-1", "CNEI_TRAINER_ROUND_RETRIES must be >= 0"),
    ("TRANSIENT_RETRY_S", "-1", "CNEI_TRAINER_TRANSIENT_RETRY_S must be >= 0"),
    ("TRANSIENT_WAIT_S", "0", "CNEI_TRAINER_TRANSIENT_WAIT_S must be > 0"),
    ("TRANSIENT_WAIT_S", "nan", "CNEI_TRAINER_TRANSIENT_WAIT_S must be > 0"),
])
def test_a_trainer_with_a_setting_out_of_range_exits_naming_it(variable, value, message):
    env = {**os.environ, f"CNEI_TRAINER_{variable}": value, "CNEI_TRAINER_METRICS_PORT": "0",
           "CNEI_TRAINER_PORT": "0", "CNEI_TRAINER_NATS_URL": "nats://127.0.0.1:1",
           "CNEI_TRAINER_REDIS_URL": "redis://127.0.0.1:1/0", "OTEL_EXPORTER_OTLP_ENDPOINT": ""}
    proc = subprocess.Popen([sys.executable, "-m", "services.trainer"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the trainer started:\n{out[-2000:]}")
    assert proc.returncode != 0
    assert message in out, out[-2000:]
