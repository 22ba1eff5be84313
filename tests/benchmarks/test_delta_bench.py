"""`make bench-delta`'s measurement and table on a small pair of versions."""
from __future__ import annotations

import numpy as np
import onnx

from bench import delta as bench_delta
from tests.retrained import write_versions


def test_a_fine_tuned_version_measures_as_a_small_delta_and_lands_in_the_table(tmp_path):
    v1, v2 = write_versions(tmp_path)
    row = bench_delta.measure(v1.read_bytes(), v2.read_bytes(), repeats=1)
    assert row["artifact_bytes"] == v2.stat().st_size
    assert 0 < row["delta_bytes"] < 0.1 * row["artifact_bytes"] and row["delta_of_zlib"] < 0.2
    assert row["make_s"] > 0 and row["apply_s"] > 0
    text = bench_delta.table([{"precision": "FP32", "scenario": "last layer", **row}], {"git": "abc"})
    assert "| wide_mlp FP32 | last layer |" in text and "- git: abc" in text


def test_each_scenario_changes_the_model_it_is_given(tmp_path):
    v1, _ = write_versions(tmp_path)
    before = v1.read_bytes()
    for _, scenario, change in bench_delta.SCENARIOS:
        model = onnx.load_from_string(before)
        change(model, np.random.default_rng(0))
        if "unchanged" in scenario:
            assert model.graph.name != onnx.load_from_string(before).graph.name, scenario
        else:
            assert model.SerializeToString() != before, scenario
