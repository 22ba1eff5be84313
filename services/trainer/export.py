"""Global weights -> FP32/FP16/INT8 ONNX variants with their held-out accuracy (CPU work)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx

from services.models import digits
from services.models.digits import BuiltVariant
from services.models.mlp_numpy import INPUT_SCALE, Layers
from services.models.onnx_mlp import mlp_graph, quantize_int8, read_mlp_weights

PRECISIONS = ("FP32", "FP16", "INT8")


def weights_from_onnx(data: bytes) -> Layers:
    """The dense layers of a CNEI MLP artifact."""
    return read_mlp_weights(onnx.load_from_string(data))


def build_variants(layers: Layers, out_dir: Path, name: str, x_test: np.ndarray, y_test: np.ndarray,
                   metadata: dict[str, str]) -> list[BuiltVariant]:
    """Write FP32, FP16 and INT8 files under out_dir and measure each one with ONNX Runtime."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {p: out_dir / f"{name}-{p.lower()}.onnx" for p in PRECISIONS}
    weights, biases = [w for w, _ in layers], [b for _, b in layers]
    for precision in ("FP32", "FP16"):
        onnx.save(mlp_graph(weights, biases, name=name, input_scale=INPUT_SCALE, precision=precision),
                  paths[precision])
    quantize_int8(paths["FP32"], paths["INT8"])
    built = []
    for precision, path in paths.items():
        meta = {**metadata,
                "accuracy": f"{digits.accuracy(path, x_test, y_test):.4f}",
                "accuracy_dataset": "sklearn.load_digits held-out 25% (seed 0)",
                "test_samples": str(len(y_test)), "task": "classification",
                "labels": json.dumps([str(i) for i in range(layers[-1][0].shape[1])]),
                "max_batch_size": "1024"}
        built.append(BuiltVariant(path, precision, meta))
    return built
