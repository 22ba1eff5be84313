"""Two versions of one network as a fine-tuning run leaves them: version 2 keeps every weight of
version 1 except the last layer's, and its graph is named differently (the header shifts)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from services.models.onnx_mlp import mlp_graph
from services.models.wide_mlp import random_weights

LAYERS = (64, 128, 128, 10)  # ~0.1 MB of FP32 weights


def write_versions(folder: Path, seed: int = 3) -> tuple[Path, Path]:
    """(version 1, version 2) ONNX files in `folder` (another `seed`: other bytes)."""
    weights, biases = random_weights(LAYERS, seed=seed)
    v1 = folder / "retrained-v1.onnx"
    onnx.save(mlp_graph(weights, biases, name="retrained"), v1)
    tuned = [*weights[:-1], weights[-1] + np.float32(0.01)]
    v2 = folder / "retrained-v2.onnx"
    onnx.save(mlp_graph(tuned, [*biases[:-1], biases[-1] - np.float32(0.01)], name="retrained-site-a-round-2"), v2)
    return v1, v2
