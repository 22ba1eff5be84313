"""`cnei config` documents every setting of every service."""
from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.coordinator.settings import PREFIX as COORDINATOR, CoordinatorSettings
from services.edge_runtime.settings import PREFIX as RUNTIME, RuntimeSettings
from services.registry.settings import PREFIX as REGISTRY, RegistrySettings

SERVICES = Path(__file__).resolve().parents[2] / "services"


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


def _environment_reads() -> list[tuple[str, ast.expr]]:
    """(file:line, the name read) for each os.environ.get / os.getenv / os.environ[...] in services/."""
    reads = []
    for path in sorted(SERVICES.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.environ.get", "os.getenv") and node.args:
                reads.append((f"{path.relative_to(SERVICES.parent)}:{node.lineno}", node.args[0]))
            elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
                reads.append((f"{path.relative_to(SERVICES.parent)}:{node.lineno}", node.slice))
    return reads


def _as_pattern(name: ast.expr) -> re.Pattern | None:
    """The variables a read may name: a constant, or an f-string whose holes may be any name part."""
    if isinstance(name, ast.Constant) and isinstance(name.value, str):
        return re.compile(re.escape(name.value))
    if isinstance(name, ast.JoinedStr):
        return re.compile("".join(re.escape(part.value) if isinstance(part, ast.Constant) else "[A-Z0-9_]*"
                                  for part in name.values))
    return None


def test_every_environment_variable_the_code_reads_is_listed_by_cnei_config(output):
    listed = {line.split()[0] for line in output.splitlines() if line.startswith("CNEI_")}
    reads = _environment_reads()
    assert reads, "the scan found no environment reads at all"
    unlisted = []
    for where, name in reads:
        pattern = _as_pattern(name)
        if isinstance(name, ast.Constant) and not str(name.value).startswith("CNEI_"):
            continue  # not ours (e.g. PROMETHEUS_MULTIPROC_DIR)
        if pattern is None:
            unlisted.append(f"{where}: reads {ast.unparse(name)}, a name the scan cannot tell (use a settings class)")
        elif not any(pattern.fullmatch(variable) for variable in listed):
            unlisted.append(f"{where}: {ast.unparse(name)}")
    assert not unlisted, "read but not listed by `cnei config`:\n" + "\n".join(unlisted)
