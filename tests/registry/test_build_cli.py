"""`cnei models build` against a real registry: variants refused for the reason they fail, a gate
on top-1 agreement, a re-run after an interrupted build, and Ctrl-C."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.cli import main as cli
from services.registry import variants


@pytest.fixture(scope="module")
def fp32(built) -> Path:
    return built["FP32"].path


def _matmul(tmp_path: Path, name: str, w: np.ndarray) -> Path:
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], name,
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[1]])],
                              [numpy_helper.from_array(w.astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


async def _cli(argv: list[str]) -> int:
    return await asyncio.to_thread(cli.main, argv)


async def _precisions(client, name: str) -> set[str]:
    return {v.precision for v in await client.list(name)}


async def test_an_fp16_variant_beyond_its_range_is_refused_and_the_other_precisions_still_built(
        registry, client, name, tmp_path, capsys):
    big = _matmul(tmp_path, "big", np.random.default_rng(0).normal(size=(4, 3)) * 1e5)
    await client.push_file(big, name, "1", "FP32")
    assert await _cli(["models", "build", name, "--registry", registry.target]) == 2
    err = capsys.readouterr().err
    assert "error (INVALID_ARGUMENT): FP16 variant refused: weight 'W'" in err and "FP16 range" in err
    assert await _precisions(client, name) == {"FP32", "INT8"}


async def test_variants_below_the_minimum_agreement_are_refused_unless_the_gate_is_lowered(
        registry, client, name, tmp_path, capsys):
    near_ties = _matmul(tmp_path, "ties", np.ones((64, 10)) + np.arange(10) * 1e-4)  # no variant keeps the argmax
    await client.push_file(near_ties, name, "1", "FP32")
    assert await _cli(["models", "build", name, "--registry", registry.target]) == 2
    err = capsys.readouterr().err
    for precision in variants.BUILDABLE:
        assert f"{precision} variant refused: top-1 agreement with FP32 on output 'y' is 0.0000, below the minimum 0.9" in err
    assert await _precisions(client, name) == {"FP32"}
    assert await _cli(["models", "build", name, "--min-agreement", "0", "--registry", registry.target]) == 0
    built = {v.precision: v for v in await client.list(name)}
    assert set(built) == {"FP32", *variants.BUILDABLE} and built["INT8"].metadata["top1_agreement_vs_fp32"] == "0.0000"


async def test_a_rerun_after_an_interrupted_build_skips_what_was_registered_and_builds_the_rest(
        registry, client, fp32, name, tmp_path, capsys):
    parent = await client.push_file(fp32, name, "1", "FP32")
    half = variants.build_one(fp32, "FP16", tmp_path)  # what the interrupted run had registered
    await client.push_file(half, name, "1", "FP16", variants.describe(fp32, half, None, parent.sha256, "FP16"))
    assert await _cli(["models", "build", name, "--registry", registry.target]) == 0
    out = capsys.readouterr().out
    assert f"{name} v1 FP16 already built from this FP32: skipped" in out and f"registered {name} v1 INT8" in out
    built = {v.precision: v for v in await client.list(name)}
    assert built["INT8"].metadata["built_from_sha256"] == parent.sha256



@pytest.mark.parametrize(("extra", "says", "not_said"), [
    ([], r"top-1 agreement with FP32 \d\.\d{4}\)", "accuracy"),  # no evaluation set: agreement only
    (["--eval", "digits"], r"accuracy \d\.\d{4} on digits held-out split, top-1 agreement with FP32 \d\.\d{4}\)", None),
], ids=["agreement", "eval-set"])
async def test_a_built_variant_is_printed_with_what_its_number_measures(
        registry, client, fp32, name, capsys, extra, says, not_said):
    await client.push_file(fp32, name, "1", "FP32")
    assert await _cli(["models", "build", name, "--precisions", "INT8", *extra, "--registry", registry.target]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(f"registered {name} v1 INT8"))
    assert re.search(says, line), line
    assert "accuracy/agreement" not in line and (not_said is None or not_said not in line)

async def test_a_variant_registered_from_another_fp32_is_refused_by_name(registry, client, fp32, name, built, capsys):
    await client.push_file(fp32, name, "1", "FP32")
    await client.push_file(built["FP16"].path, name, "1", "FP16", {"accuracy": "0.9"})  # pushed by hand
    assert await _cli(["models", "build", name, "--registry", registry.target]) == 2
    err = capsys.readouterr().err
    assert f"error (FAILED_PRECONDITION): {name} v1 FP16 is already registered and was not built from this FP32" in err
    assert await _precisions(client, name) == {"FP32", "FP16"}


async def test_ctrl_c_during_a_build_prints_interrupted_and_exits_130(registry, client, fp32, name):
    """The registry is stopped (SIGSTOP) once the build has begun until the Ctrl-C is sent, so the
    build cannot finish before the Ctrl-C reaches it however slowly this test is scheduled (it
    waits on the registry, or converts and then waits on the upload)."""
    await client.push_file(fp32, name, "1", "FP32")
    proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "models", "build", name,
                             "--registry", registry.target], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.set_blocking(proc.stderr.fileno(), False)
    seen, deadline = b"", time.monotonic() + 60
    while b"fetching FP32" not in seen and time.monotonic() < deadline and proc.poll() is None:
        seen += proc.stderr.read() or b""
        await asyncio.sleep(0.01)
    registry.proc.send_signal(signal.SIGSTOP)
    try:
        assert proc.poll() is None, f"the build ended before it was interrupted: {seen!r}"
        proc.send_signal(signal.SIGINT)
    finally:
        registry.proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=60)
    err = (seen + (err or b"")).decode()
    assert proc.returncode == 130, (out, err)
    assert err.rstrip().splitlines()[-1] == "interrupted" and "Traceback" not in err


async def test_pushing_a_directory_is_refused_before_any_call(registry, tmp_path, name, capsys):
    assert await _cli(["models", "push", str(tmp_path), "--name", name, "--version", "1",
                       "--registry", registry.target]) == 2
    err = capsys.readouterr().err
    assert f"error (INVALID_ARGUMENT): cannot read model file '{tmp_path}': Is a directory" in err


async def test_a_meta_flag_without_an_equals_sign_is_refused_by_name(registry, fp32, name, capsys):
    assert await _cli(["models", "push", str(fp32), "--name", name, "--version", "1", "--meta", "accuracy",
                       "--registry", registry.target]) == 2
    assert "--meta needs KEY=VALUE, not 'accuracy'" in capsys.readouterr().err


async def test_a_canary_of_an_unknown_model_says_not_found(registry, name, capsys):
    assert await _cli(["deploy", "canary", name, "1", "--registry", registry.target]) == 2
    assert f"error (NOT_FOUND): model '{name}' not found in the registry" in capsys.readouterr().err
