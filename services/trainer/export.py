"""Global weights -> FP32/FP16/INT8 ONNX variants with their held-out accuracy (CPU work)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from services.models import digits
from services.models.digits import BuiltVariant
from services.models.mlp_numpy import Layers
from services.models.onnx_mlp import read_mlp_weights

PRECISIONS = digits.PRECISIONS


def weights_from_onnx(data: bytes) -> Layers:
    """The dense layers of a CNEI MLP artifact."""
    return read_mlp_weights(onnx.load_from_string(data))


def build_variants(layers: Layers, out_dir: Path, name: str, x_test: np.ndarray, y_test: np.ndarray,
                   metadata: dict[str, str]) -> list[BuiltVariant]:
    """Write FP32, FP16 and INT8 files under out_dir and measure each one with ONNX Runtime."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return digits.write_variants([w for w, _ in layers], [b for _, b in layers], out_dir, name,
                                 x_test, y_test, PRECISIONS, metadata)
