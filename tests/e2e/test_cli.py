"""The `cnei` command line against the running mesh."""
from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.processes import run_cnei

def test_models_list_shows_every_variant_with_its_accuracy(mesh):
    out = run_cnei("models", "list", "--registry", mesh.registry)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("digits")]
    assert {r[2] for r in rows} >= {"FP32", "FP16", "INT8"}
    assert all(float(r[4]) > 0.9 for r in rows)


def test_infer_prints_the_top_1_classes_and_who_served(mesh):
    out = run_cnei("infer", "digits", "--digits", "4", "--url", mesh.coordinator)
    assert out.returncode == 0, out.stderr
    assert "top-1: [0, 1, 2, 3]" in out.stdout and "cnei_node" in out.stdout


def test_infer_params_reach_the_coordinator_and_impossible_demands_say_why(mesh):
    out = run_cnei("infer", "digits", "--digits", "2", "--url", mesh.coordinator, "--param", "precision=INT8")
    assert out.returncode == 0, out.stderr
    assert "'cnei_precision': 'INT8'" in out.stdout
    floor = run_cnei("infer", "digits", "--digits", "2", "--url", mesh.coordinator, "--param", "accuracy_floor=0.9999")
    assert floor.returncode == 2 and "FAILED_PRECONDITION" in floor.stderr and "accuracy_floor" in floor.stderr
    bad = run_cnei("infer", "digits", "--url", mesh.coordinator, "--param", "priority=high")
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr and "priority" in bad.stderr


def test_deploy_apply_and_get_round_trip_and_bad_specs_are_refused(mesh, tmp_path):
    spec = tmp_path / "d.yaml"
    spec.write_text("model: digits\nscheduler:\n  policy: least_loaded\n")
    try:
        applied = run_cnei("deploy", "apply", str(spec), "--registry", mesh.registry)
        assert applied.returncode == 0, applied.stderr
        shown = run_cnei("deploy", "get", "digits", "--registry", mesh.registry)
        assert json.loads(shown.stdout)["scheduler"]["policy"] == "least_loaded"
    finally:
        spec.write_text("model: digits\n")
        run_cnei("deploy", "apply", str(spec), "--registry", mesh.registry)
    spec.write_text("model: digits\nscheduler:\n  policy: fastest\n")
    bad = run_cnei("deploy", "apply", str(spec), "--registry", mesh.registry)
    assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr and "fastest" in bad.stderr
    missing = run_cnei("models", "push", str(Path(spec)), "--name", "x", "--version", "1",
                    "--registry", mesh.registry)
    assert missing.returncode == 2 and "not a valid ONNX model" in missing.stderr
