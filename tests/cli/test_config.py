"""`cnei config` documents every setting of every service."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from services.coordinator.settings import PREFIX as COORDINATOR, CoordinatorSettings
from services.edge_runtime.settings import PREFIX as RUNTIME, RuntimeSettings
from services.registry.settings import PREFIX as REGISTRY, RegistrySettings


@pytest.fixture(scope="module")
def output() -> str:
    result = subprocess.run([sys.executable, "-m", "services.cli.main", "config"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("cls,prefix", [(RegistrySettings, REGISTRY), (CoordinatorSettings, COORDINATOR),
                                        (RuntimeSettings, RUNTIME)])
def test_every_settings_field_is_listed_with_its_meaning(output, cls, prefix):
    lines = {line.split()[0]: line for line in output.splitlines() if line.startswith(prefix)}
    for f in dataclasses.fields(cls):
        variable = prefix + f.name.upper()
        assert variable in lines, f"{variable} missing"
        assert f.metadata.get("doc") and f.metadata["doc"][:20] in lines[variable]
