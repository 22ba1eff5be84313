"""The `digits` demo model: an MLP trained on scikit-learn's bundled load_digits data."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from services.models.onnx_mlp import mlp_graph, quantize_int8

log = logging.getLogger(__name__)
NAME = "digits"
VERSION = "1"
SEED = 0
PRECISIONS = ("FP32", "FP16", "INT8")


@dataclass(frozen=True)
class BuiltVariant:
    path: Path
    precision: str
    metadata: dict[str, str]


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, x_test, y_train, y_test): raw pixels 0..16 as float32, 25% held out."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.data.astype(np.float32)
    return train_test_split(x, data.target, test_size=0.25, random_state=SEED, stratify=data.target)


def load_all() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.data.astype(np.float32), data.target


def classifier_output(session, name: str = "") -> str:
    """The output holding the class scores: `name` when given, else the only 2-D float output (the
    first, when there are several)."""
    outputs = session.get_outputs()
    if name:
        if name not in [o.name for o in outputs]:
            raise ValueError(f"the model has no output '{name}' (outputs: {[o.name for o in outputs]})")
        return name
    scores = [o.name for o in outputs if o.type == "tensor(float)" and len(o.shape) == 2]
    if not scores:
        raise ValueError(f"no 2-D float output to read class scores from (outputs: "
                         f"{[(o.name, o.type, o.shape) for o in outputs]})")
    return scores[0]


def fixed_batch(shape) -> int | None:
    """The fixed first (batch) dimension of an ONNX Runtime input shape, None when it is dynamic."""
    first = shape[0] if shape else None
    return first if isinstance(first, int) and first > 0 else None


def accuracy(path: Path, x: np.ndarray, y: np.ndarray, output: str = "") -> float:
    """Top-1 accuracy of an ONNX classifier measured with ONNX Runtime, on `output` (else the 2-D
    float output), in batches of the model's fixed batch size when it has one (the last padded)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    batch = fixed_batch(spec.shape) or max(len(x), 1)
    name = classifier_output(session, output)
    scores = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), chunk.dtype)])
        scores.append(session.run([name], {spec.name: padded})[0][:len(chunk)])
    return float((np.concatenate(scores).argmax(axis=1) == y).mean())


def build(out_dir: Path, hidden: tuple[int, ...] = (64,), name: str = NAME,
          precisions: tuple[str, ...] = PRECISIONS) -> list[BuiltVariant]:
    """Train, export FP32/FP16/INT8 ONNX files and measure each one's held-out accuracy.

    A previous build in `out_dir` (its manifest and files) is reused."""
    from sklearn.neural_network import MLPClassifier

    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / f"{name}-manifest.json"
    if manifest.exists():
        rows = json.loads(manifest.read_text())
        if all((out_dir / r["file"]).exists() for r in rows):
            return [BuiltVariant(out_dir / r["file"], r["precision"], r["metadata"]) for r in rows]
    x_train, x_test, y_train, y_test = load_split()
    clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=600, random_state=SEED)
    clf.fit(x_train / 16.0, y_train)
    weights = [w.astype(np.float32) for w in clf.coefs_]
    biases = [b.astype(np.float32) for b in clf.intercepts_]
    built = write_variants(weights, biases, out_dir, name, x_test, y_test, precisions)
    rows = [{"file": b.path.name, "precision": b.precision, "metadata": b.metadata} for b in built]
    manifest.write_text(json.dumps(rows, indent=1))
    return built


def write_variants(weights: list[np.ndarray], biases: list[np.ndarray], out_dir: Path, name: str,
                   x_test: np.ndarray, y_test: np.ndarray, precisions: tuple[str, ...] = PRECISIONS,
                   metadata: dict[str, str] | None = None) -> list[BuiltVariant]:
    """ONNX files of a digits MLP (FP32, FP16; INT8 quantised from FP32), each with its held-out
    accuracy and the digits metadata (on top of `metadata`)."""
    paths = {}
    for precision in ("FP32", "FP16"):
        paths[precision] = out_dir / f"{name}-{precision.lower()}.onnx"
        model = mlp_graph(weights, biases, name=name, input_scale=1 / 16, precision=precision)
        onnx.save(model, paths[precision])
    paths["INT8"] = out_dir / f"{name}-int8.onnx"
    quantize_int8(paths["FP32"], paths["INT8"])
    built = []
    for precision in (p for p in paths if p in precisions):
        meta = {
            **(metadata or {}),
            "accuracy": f"{accuracy(paths[precision], x_test, y_test):.4f}",
            "accuracy_dataset": "sklearn.load_digits held-out 25% (seed 0)",
            "test_samples": str(len(y_test)),
            "task": "classification",
            "labels": json.dumps([str(i) for i in range(weights[-1].shape[1])]),
            "max_batch_size": "1024",
        }
        built.append(BuiltVariant(paths[precision], precision, meta))
        log.info("built %s %s accuracy %s", name, precision, meta["accuracy"])
    return built


LARGE_NAME = "digits-large"
TINY_NAME = "digits-tiny"


def build_large(out_dir: Path) -> list[BuiltVariant]:
    """The cloud tier's model for joint inference: a wider MLP, FP32 only."""
    return build(out_dir, hidden=(256, 256), name=LARGE_NAME, precisions=("FP32",))


def build_tiny(out_dir: Path) -> list[BuiltVariant]:
    """A deliberately small edge model (8 hidden units) in FP32 and INT8."""
    return build(out_dir, hidden=(8,), name=TINY_NAME, precisions=("FP32", "INT8"))
