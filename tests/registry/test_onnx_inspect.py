"""The registry's check of a pushed ONNX artifact: its signature, its refusals and its memory."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.common.errors import InvalidArgument
from services.common.model_spec import TensorSpec
from services.registry.onnx_inspect import inspect_onnx

# Growth of the peak memory of inspect_onnx over the artifact's size, at most: the ONNX checker holds
# the file read whole and the model parsed from it, 2.0-2.05 × measured (deploy/helm/cnei/values.yaml
# sizes the registry's memory limit from the largest artifact with this factor).
PEAK_OVER_ARTIFACT = 2.25


def _matmul_model(rows: int, weights_as_input: bool = False, ir_version: int = 8) -> onnx.ModelProto:
    """y = x @ W with W (rows × 16 FP32) an initializer, listed among the graph inputs if asked."""
    weights = numpy_helper.from_array(np.random.default_rng(1).random((rows, 16), dtype=np.float32), "W")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", rows])]
    if weights_as_input:
        inputs.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [rows, 16]))
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], [weights])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=ir_version)


@pytest.mark.parametrize("weights_as_input, ir_version", [(False, 8), (True, 8), (True, 3)])
def test_the_signature_is_the_graph_inputs_that_are_not_initializers_and_the_outputs(
        tmp_path, weights_as_input, ir_version):
    path = tmp_path / "m.onnx"
    onnx.save(_matmul_model(64, weights_as_input, ir_version), path)
    assert inspect_onnx(path) == ([TensorSpec("x", "FP32", (-1, 64))], [TensorSpec("y", "FP32", (-1, 16))])


def test_a_model_with_its_weights_in_an_external_file_beside_it_is_read_without_them(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_matmul_model(4096), path, save_as_external_data=True, location="m.data", size_threshold=0)
    assert inspect_onnx(path) == ([TensorSpec("x", "FP32", (-1, 4096))], [TensorSpec("y", "FP32", (-1, 16))])


def test_a_model_whose_external_weights_are_missing_is_refused(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_matmul_model(4096), path, save_as_external_data=True, location="m.data", size_threshold=0)
    (tmp_path / "m.data").unlink()
    with pytest.raises(InvalidArgument, match="not a valid ONNX model"):
        inspect_onnx(path)


def test_a_model_failing_the_full_check_is_refused(tmp_path):
    model = _matmul_model(64)
    model.graph.node[0].input[1] = "missing"
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(InvalidArgument, match="not a valid ONNX model"):
        inspect_onnx(path)


def test_a_model_without_graph_inputs_is_refused(tmp_path):
    node = helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(np.ones(2, np.float32)))
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    with pytest.raises(InvalidArgument, match="must declare graph inputs and outputs"):
        inspect_onnx(path)


# The process's peak resident memory (VmHWM: ru_maxrss would carry the pytest process's over exec).
_PEAK = """
import re, sys
from pathlib import Path
from services.registry.onnx_inspect import inspect_onnx
def peak():
    return int(re.search(r"VmHWM:\\s*(\\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
before = peak()
inspect_onnx(Path(sys.argv[1]))
print(peak() - before)
"""


def test_checking_an_artifact_takes_at_most_two_and_a_quarter_times_its_size_in_memory(tmp_path):
    path = tmp_path / "big.onnx"
    onnx.save(_matmul_model(1 << 20), path)  # 64 MiB of weights
    size = path.stat().st_size
    done = subprocess.run([sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True,
                          cwd=Path(__file__).parents[2], check=True)
    grown = int(done.stdout.split()[-1])
    assert grown <= PEAK_OVER_ARTIFACT * size, f"peak grew by {grown / size:.2f} × the artifact's size"
