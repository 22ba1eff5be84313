"""Build ONNX graphs for dense MLPs (FP32, FP16) and quantise them to INT8 with ONNX Runtime."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def mlp_graph(
    weights: list[np.ndarray], biases: list[np.ndarray], *, name: str,
    input_name: str = "input", output_name: str = "probabilities",
    input_scale: float = 1.0, precision: str = "FP32",
) -> onnx.ModelProto:
    """Dense layers with ReLU between them and softmax at the end; batch dimension dynamic.

    FP16 keeps the FP32 interface: the input is cast to half, the output back to float.
    """
    half = precision == "FP16"
    np_type = np.float16 if half else np.float32
    in_dim, out_dim = weights[0].shape[0], weights[-1].shape[1]
    nodes, inits = [], []
    current = input_name
    if input_scale != 1.0:
        inits.append(numpy_helper.from_array(np.array(input_scale, np.float32), "input_scale"))
        nodes.append(helper.make_node("Mul", [current, "input_scale"], ["scaled"]))
        current = "scaled"
    if half:
        nodes.append(helper.make_node("Cast", [current], ["x_half"], to=TensorProto.FLOAT16))
        current = "x_half"
    for i, (w, b) in enumerate(zip(weights, biases)):
        inits += [numpy_helper.from_array(w.astype(np_type), f"W{i}"),
                  numpy_helper.from_array(b.astype(np_type), f"B{i}")]
        nodes.append(helper.make_node("MatMul", [current, f"W{i}"], [f"mm{i}"]))
        nodes.append(helper.make_node("Add", [f"mm{i}", f"B{i}"], [f"z{i}"]))
        current = f"z{i}"
        if i < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [current], [f"h{i}"]))
            current = f"h{i}"
    nodes.append(helper.make_node("Softmax", [current], ["soft"], axis=-1))
    current = "soft"
    if half:
        nodes.append(helper.make_node("Cast", [current], ["soft_f"], to=TensorProto.FLOAT))
        current = "soft_f"
    nodes.append(helper.make_node("Identity", [current], [output_name]))
    graph = helper.make_graph(
        nodes, name, [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", in_dim])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", out_dim])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="cnei")
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    """Dynamic INT8 quantisation of the weights (MatMulInteger) with ONNX Runtime's tooling."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _without_preprocess_advice():
        quantize_dynamic(str(fp32_path), str(int8_path), weight_type=QuantType.QInt8)


PREPROCESS_ADVICE = "Please consider to run pre-processing before quantization"


class _DropPreprocessAdvice(logging.Filter):
    """Drops the advice ONNX Runtime's quantiser logs on the root logger at every call: its
    pre-processing (shape inference, graph optimisation) has nothing to add to these MLPs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(PREPROCESS_ADVICE)


@contextmanager
def _without_preprocess_advice() -> Iterator[None]:
    """The root logger drops that advice while the block runs (only that line, only then)."""
    advice = _DropPreprocessAdvice()
    root = logging.getLogger()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def read_mlp_weights(model: onnx.ModelProto) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (W, B) pairs of an MLP built by `mlp_graph`, as float32, from its initializers."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = []
    while f"W{len(layers)}" in inits and f"B{len(layers)}" in inits:
        i = len(layers)
        layers.append((inits[f"W{i}"].astype(np.float32), inits[f"B{i}"].astype(np.float32)))
    if not layers:
        raise ValueError(f"model '{model.graph.name}' has no W0/B0 initializers (not a CNEI MLP)")
    return layers
