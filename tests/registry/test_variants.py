"""The model manager's variant builder: FP16/INT8 of any FP32 ONNX model, and `cnei models build`
against a real registry."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.cli import main as cli
from services.common.errors import InvalidArgument
from services.models.digits import accuracy, load_split
from services.registry import variants


@pytest.fixture(scope="module")
def fp32(digits_models) -> Path:
    return next(v.path for v in digits_models if v.precision == "FP32")


def _io_types(path: Path) -> list[str]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [t.type for t in session.get_inputs() + session.get_outputs()]


@pytest.mark.parametrize("precision", variants.BUILDABLE)
def test_a_built_variant_keeps_the_fp32_interface_and_follows_fp32(fp32, tmp_path, precision):
    path = variants.build_one(fp32, precision, tmp_path)
    assert _io_types(path) == ["tensor(float)", "tensor(float)"]
    meta = variants.describe(fp32, path, None, "ab" * 32)
    assert float(meta["top1_agreement_vs_fp32"]) >= 0.97
    assert float(meta["max_abs_diff_vs_fp32"]) < 0.5
    assert meta["built_from_sha256"] == "ab" * 32 and "accuracy" not in meta


def test_fp16_converts_weights_constants_and_internal_casts_of_a_hand_made_graph(tmp_path):
    w = numpy_helper.from_array(np.eye(3, dtype=np.float32) * 2, "W")
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(3, np.float32))),
             helper.make_node("MatMul", ["x", "W"], ["m"]),
             helper.make_node("Add", ["m", "c"], ["a"]),
             helper.make_node("Cast", ["a"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    half = variants.to_fp16(model)
    assert {i.data_type for i in half.graph.initializer} == {TensorProto.FLOAT16}
    path = tmp_path / "half.onnx"
    onnx.save(half, str(path))
    y = variants.run(path, {"x": np.array([[1, 2, 3]], np.float32)})["y"]
    np.testing.assert_allclose(y, [[3, 5, 7]])


def test_accuracy_is_measured_when_labelled_data_is_given(fp32, tmp_path):
    _, x_test, _, y_test = load_split()
    path = variants.build_one(fp32, "INT8", tmp_path)
    fp32_acc = accuracy(fp32, x_test, y_test)
    meta = variants.describe(fp32, path, (x_test, y_test), "cd" * 32)
    assert abs(float(meta["accuracy"]) - fp32_acc) <= 0.015


def test_what_cannot_be_built_is_refused_with_the_reason(fp32, tmp_path):
    with pytest.raises(InvalidArgument, match="not 'INT4'"):
        variants.build_one(fp32, "INT4", tmp_path)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(InvalidArgument, match="FP16 variant of broken.onnx could not be built"):
        variants.build_one(broken, "FP16", tmp_path)


async def test_cnei_models_build_registers_measured_variants_with_a_progress_bar(registry, client, fp32,
                                                                                 name, capsys):
    parent = await client.push_file(fp32, name, "1", "FP32", {"task": "classification", "max_batch_size": "64"})
    code = await _cli(["models", "build", name, "--eval", "digits", "--registry", registry.target])
    assert code == 0
    err = capsys.readouterr().err
    assert f"build {name} v1 [" in err and "7/7 steps" in err
    built = {v.precision: v for v in await client.list(name)}
    assert set(built) == {"FP32", "FP16", "INT8"}
    for precision in variants.BUILDABLE:
        meta = built[precision].metadata
        assert meta["built_from_sha256"] == parent.sha256
        assert float(meta["accuracy"]) >= 0.95 and meta["max_batch_size"] == "64"


async def test_cnei_models_build_of_an_unknown_model_says_not_found(registry, name, capsys):
    assert await _cli(["models", "build", name, "--registry", registry.target]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err


async def _cli(argv: list[str]) -> int:
    import asyncio

    return await asyncio.to_thread(cli.main, argv)
