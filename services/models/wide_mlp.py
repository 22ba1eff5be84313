"""The `wide_mlp` benchmark model: 64 → 2048 → 2048 → 10 with seeded random weights (untrained)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx

from services.models.digits import BuiltVariant, load_all
from services.models.onnx_mlp import mlp_graph, quantize_int8

log = logging.getLogger(__name__)
NAME = "wide_mlp"
VERSION = "1"
SEED = 0
LAYERS = (64, 2048, 2048, 10)


def random_weights(layers: tuple[int, ...] = LAYERS, seed: int = SEED) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """He-initialised dense weights and small biases, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    weights = [rng.normal(0.0, np.sqrt(2.0 / n_in), (n_in, n_out)).astype(np.float32)
               for n_in, n_out in zip(layers, layers[1:])]
    biases = [rng.normal(0.0, 0.01, n_out).astype(np.float32) for n_out in layers[1:]]
    return weights, biases


def top1_agreement(path: Path, reference: Path, x: np.ndarray) -> float:
    """Share of inputs whose arg-max class from `path` equals the one from `reference`."""
    import onnxruntime as ort

    def classes(p: Path) -> np.ndarray:
        session = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x})[0].argmax(axis=1)

    return float((classes(path) == classes(reference)).mean())


def _reuse(out_dir: Path) -> list[BuiltVariant] | None:
    manifest = out_dir / f"{NAME}-manifest.json"
    if not manifest.exists():
        return None
    rows = json.loads(manifest.read_text())
    if not all((out_dir / r["file"]).exists() for r in rows):
        return None
    return [BuiltVariant(out_dir / r["file"], r["precision"], r["metadata"]) for r in rows]


def build(out_dir: Path) -> list[BuiltVariant]:
    """Export FP32 and INT8 ONNX files (batch dimension dynamic); a previous build is reused.

    The weights are random, so there is no accuracy: INT8 metadata records its top-1
    agreement with FP32 on the load_digits images instead."""
    out_dir.mkdir(parents=True, exist_ok=True)
    reused = _reuse(out_dir)
    if reused is not None:
        return reused
    weights, biases = random_weights()
    paths = {"FP32": out_dir / f"{NAME}-fp32.onnx", "INT8": out_dir / f"{NAME}-int8.onnx"}
    onnx.save(mlp_graph(weights, biases, name=NAME, input_scale=1 / 16), paths["FP32"])
    quantize_int8(paths["FP32"], paths["INT8"])
    x, _ = load_all()
    built = []
    for precision, path in paths.items():
        meta = {
            "task": "classification",
            "weights": f"random, He-initialised, seed {SEED} (untrained)",
            "layers": "-".join(str(n) for n in LAYERS),
            "top1_agreement_with_fp32": f"{top1_agreement(path, paths['FP32'], x):.4f}",
            "agreement_dataset": "sklearn.load_digits, all 1797 images",
            "labels": json.dumps([str(i) for i in range(LAYERS[-1])]),
            "max_batch_size": "1024",
        }
        built.append(BuiltVariant(path, precision, meta))
        log.info("built %s %s (%d bytes)", NAME, precision, path.stat().st_size)
    rows = [{"file": b.path.name, "precision": b.precision, "metadata": b.metadata} for b in built]
    (out_dir / f"{NAME}-manifest.json").write_text(json.dumps(rows, indent=1))
    return built
