"""What the variant builder refuses and measures: FP16 beyond its range, inf/NaN outputs, a top-1
agreement gate, every output of multi-output models, fixed batch sizes and integer inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from services.common.errors import InvalidArgument
from services.models.digits import accuracy
from services.registry import variants

RNG = np.random.default_rng(0)


def _save(tmp_path: Path, name: str, nodes, inputs, outputs, weights, opset: int = 17) -> Path:
    graph = helper.make_graph(nodes, name, inputs, outputs, [numpy_helper.from_array(w, n) for n, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _float(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _matmul(tmp_path: Path, name: str, w: np.ndarray, batch="N") -> Path:
    return _save(tmp_path, name, [helper.make_node("MatMul", ["x", "W"], ["y"])], [_float("x", [batch, w.shape[0]])],
                 [_float("y", [batch, w.shape[1]])], {"W": w.astype(np.float32)})


def _describe(fp32: Path, precision: str, tmp_path: Path, **kwargs) -> dict[str, str]:
    built = variants.build_one(fp32, precision, tmp_path)
    return variants.describe(fp32, built, None, "ab" * 32, precision, **kwargs)


def test_fp16_refuses_weights_beyond_its_range_naming_the_weight(tmp_path):
    fp32 = _matmul(tmp_path, "big", RNG.normal(size=(4, 3)) * 1e5)
    with pytest.raises(InvalidArgument, match=r"FP16 variant refused: weight 'W' .* beyond the FP16 range \(\+-65504\)"):
        variants.build_one(fp32, "FP16", tmp_path)


def _rounded_through_fp16(fp32: Path, output: str, tmp_path: Path) -> Path:
    """A candidate that computes as FP32 does but stores `output` in FP16 (values beyond 65504: inf)."""
    model = onnx.load(str(fp32))
    for node in model.graph.node:  # the graph computes on the FP32 value; only the output is rounded
        node.output[:] = [f"{output}__fp32" if o == output else o for o in node.output]
        node.input[:] = [f"{output}__fp32" if i == output else i for i in node.input]
    model.graph.node.extend([helper.make_node("Cast", [f"{output}__fp32"], [f"{output}__fp16"], to=TensorProto.FLOAT16),
                             helper.make_node("Cast", [f"{output}__fp16"], [output], to=TensorProto.FLOAT)])
    path = tmp_path / f"{fp32.stem}-rounded.onnx"
    onnx.save(model, str(path))
    return path


def test_a_variant_whose_output_overflows_to_inf_where_fp32_is_finite_is_refused(tmp_path):
    fp32 = _matmul(tmp_path, "act", np.full((64, 10), 300.0))  # weights fit FP16, 64 inputs up to 16 do not
    with pytest.raises(InvalidArgument, match=r"FP16 variant refused: output 'y' is inf/NaN on \d+ of \d+ probe "
                                              r"values where FP32's are finite"):
        variants.describe(fp32, _rounded_through_fp16(fp32, "y", tmp_path), None, "ab" * 32, "FP16")


def test_a_variant_below_the_minimum_top1_agreement_is_refused_and_the_gate_can_be_lowered():
    reference = {"y": np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], np.float32)}
    candidate = {"y": np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], np.float32)}
    with pytest.raises(InvalidArgument, match=r"INT8 variant refused: top-1 agreement .* 'y' is 0.5000, below the "
                                              r"minimum 0.9"):
        variants.compare(reference, candidate, "INT8", min_agreement=variants.MIN_AGREEMENT)
    meta = variants.compare(reference, candidate, "INT8", min_agreement=0.5)
    assert meta == {"max_abs_diff_vs_fp32": "1", "top1_agreement_vs_fp32": "0.5000"}


def _two_outputs(tmp_path: Path, name: str, second_scale: float, label_first: bool) -> Path:
    w1, w2 = RNG.normal(size=(4, 5)), RNG.normal(size=(4, 5)) * second_scale
    nodes = [helper.make_node("MatMul", ["a", "W"], ["m"]), helper.make_node("MatMul", ["b", "W2"], ["m2"]),
             helper.make_node("Add", ["m", "m2"], ["s"]), helper.make_node("Softmax", ["s"], ["probs"], axis=1),
             helper.make_node("ArgMax", ["s"], ["label"], axis=1, keepdims=0)]
    outputs = [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]), _float("probs", ["N", 5]),
               _float("m2", ["N", 5])]
    return _save(tmp_path, name, nodes, [_float("a", ["N", 4]), _float("b", ["N", 4])],
                 outputs if label_first else outputs[1:] + outputs[:1],
                 {"W": w1.astype(np.float32), "W2": w2.astype(np.float32)})


def test_every_float_output_is_checked_not_only_the_first(tmp_path):
    fp32 = _two_outputs(tmp_path, "second", 3000.0, label_first=False)  # m2 (the second float output) overflows
    with pytest.raises(InvalidArgument, match="FP16 variant refused: output 'm2' is inf/NaN"):
        variants.describe(fp32, _rounded_through_fp16(fp32, "m2", tmp_path), None, "ab" * 32, "FP16")


def test_each_float_output_is_measured_and_accuracy_reads_the_2d_float_output(tmp_path):
    fp32 = _two_outputs(tmp_path, "labelfirst", 1.0, label_first=True)  # output 0 is an int64 label
    meta = _describe(fp32, "FP16", tmp_path)
    assert {"max_abs_diff_vs_fp32.probs", "max_abs_diff_vs_fp32.m2", "top1_agreement_vs_fp32.probs",
            "top1_agreement_vs_fp32.m2"} <= set(meta) and "max_abs_diff_vs_fp32.label" not in meta
    assert float(meta["top1_agreement_vs_fp32"]) == min(float(meta["top1_agreement_vs_fp32.probs"]),
                                                        float(meta["top1_agreement_vs_fp32.m2"]))


def test_accuracy_reads_the_2d_float_output_when_an_int_label_output_comes_first(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["s"]), helper.make_node("Softmax", ["s"], ["probs"], axis=1),
             helper.make_node("ArgMax", ["s"], ["label"], axis=1, keepdims=0)]
    fp32 = _save(tmp_path, "cls", nodes, [_float("x", ["N", 4])],
                 [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]), _float("probs", ["N", 5])],
                 {"W": RNG.normal(size=(4, 5)).astype(np.float32)})
    x = RNG.random((20, 4), dtype=np.float32)
    y = variants.run(fp32, {"x": x})["label"]
    assert accuracy(fp32, x, y) == 1.0 and accuracy(fp32, x, (y + 1) % 5, output="probs") == 0.0
    with pytest.raises(ValueError, match="no output 'nosuch'"):
        accuracy(fp32, x, y, output="nosuch")


def test_a_model_with_a_fixed_batch_of_one_is_probed_and_evaluated_on_many_samples(tmp_path):
    fp32 = _matmul(tmp_path, "fixed", RNG.normal(size=(64, 10)), batch=1)
    feeds = variants.probe_batches(fp32)
    assert len(feeds) == variants.PROBE_ROWS and feeds[0]["x"].shape == (1, 64)
    x = RNG.random((7, 64), dtype=np.float32)
    labels = np.concatenate([variants.run(fp32, {"x": row[None]})["y"] for row in x]).argmax(1)
    meta = variants.describe(fp32, variants.build_one(fp32, "FP16", tmp_path), (x, labels), "ab" * 32, "FP16")
    assert meta["accuracy"] == "1.0000"


def test_integer_and_bool_inputs_are_probed_with_small_non_negative_values(tmp_path):
    emb, w = RNG.normal(size=(5, 8)).astype(np.float32), RNG.normal(size=(8, 3)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"]), helper.make_node("ReduceMean", ["e"], ["r"], axes=[1],
                                                                               keepdims=0),
             helper.make_node("Cast", ["keep"], ["k"], to=TensorProto.FLOAT), helper.make_node("Mul", ["r", "k"], ["rk"]),
             helper.make_node("MatMul", ["rk", "W"], ["y"])]
    fp32 = _save(tmp_path, "ids", nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6]),
                                         helper.make_tensor_value_info("keep", TensorProto.BOOL, ["N", 1])],
                 [_float("y", ["N", 3])], {"E": emb, "W": w}, opset=13)
    feed = variants.probe_inputs(fp32)
    assert feed["ids"].dtype == np.int64 and 0 <= feed["ids"].min() and feed["ids"].max() < 5
    assert feed["keep"].dtype == np.bool_
    assert float(_describe(fp32, "FP16", tmp_path)["top1_agreement_vs_fp32"]) >= 0.9


def test_a_model_with_fp16_inputs_is_refused_as_not_fp32(tmp_path):
    w = RNG.normal(size=(4, 3)).astype(np.float16)
    fp16 = _save(tmp_path, "half", [helper.make_node("MatMul", ["x", "W"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 4])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 3])], {"W": w})
    with pytest.raises(InvalidArgument, match=r"input 'x' is tensor\(float16\): variants are built from an FP32 model"):
        variants.probe_inputs(fp16)
