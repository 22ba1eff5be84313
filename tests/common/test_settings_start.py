"""A service started with a setting that does not convert (a word where a number or a boolean
goes) stops at once with one line naming the variable and the value, no traceback (real
processes, as `make run` and the containers start them)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize(("module", "variable", "raw", "message"), [
    ("services.registry", "CNEI_REGISTRY_TOMBSTONE_RETENTION_DAYS", "abc",
     "setting CNEI_REGISTRY_TOMBSTONE_RETENTION_DAYS: expected float, got 'abc'"),
    ("services.coordinator", "CNEI_COORDINATOR_GRPC_REFLECTION", "maybe",
     "setting CNEI_COORDINATOR_GRPC_REFLECTION: expected a boolean, got 'maybe'"),
    ("services.edge_runtime", "CNEI_RUNTIME_OUTBOX_MAX_BYTES", "lots",
     "setting CNEI_RUNTIME_OUTBOX_MAX_BYTES: expected int, got 'lots'"),
    ("services.trainer", "CNEI_TRAINER_GRPC_REFLECTION", "maybe",
     "setting CNEI_TRAINER_GRPC_REFLECTION: expected a boolean, got 'maybe'"),
    ("services.cli.main up", "CNEI_GRPC_PORT", "eighty", "setting CNEI_GRPC_PORT: expected int, got 'eighty'"),
], ids=["registry", "coordinator", "runtime", "trainer", "cnei up"])
def test_a_service_with_a_setting_that_does_not_convert_stops_with_one_line_naming_it(
        module, variable, raw, message, tmp_path):
    env = {**os.environ, variable: raw, "CNEI_REGISTRY_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", *module.split()], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == message
