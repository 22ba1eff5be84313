"""A dense MLP in plain numpy (the digits architecture): forward pass, accuracy, local SGD."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Layers = list[tuple[np.ndarray, np.ndarray]]  # (W of shape (in, out), B of shape (out,)) per layer
INPUT_SCALE = 1.0 / 16.0  # digits pixels 0..16, scaled inside the ONNX graph too


@dataclass(frozen=True)
class TrainResult:
    layers: Layers
    loss: float  # mean cross-entropy on the local data after training
    accuracy: float  # top-1 accuracy on the local data after training
    loss_before: float


def _activations(layers: Layers, x: np.ndarray) -> list[np.ndarray]:
    """Inputs of every layer, then the softmax output."""
    outs = [x.astype(np.float32) * INPUT_SCALE]
    for i, (w, b) in enumerate(layers):
        z = outs[-1] @ w + b
        outs.append(np.maximum(z, 0.0) if i < len(layers) - 1 else softmax(z))
    return outs


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predict_proba(layers: Layers, x: np.ndarray) -> np.ndarray:
    return _activations(layers, x)[-1]


def accuracy(layers: Layers, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict_proba(layers, x).argmax(axis=1) == y).mean()) if len(y) else 0.0


def cross_entropy(layers: Layers, x: np.ndarray, y: np.ndarray) -> float:
    probs = predict_proba(layers, x)
    return float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, None)).mean()) if len(y) else 0.0


def _gradients(layers: Layers, xb: np.ndarray, yb: np.ndarray) -> Layers:
    """Gradients of the mean cross-entropy of one mini-batch, per layer."""
    acts = _activations(layers, xb)
    delta = acts[-1].copy()
    delta[np.arange(len(yb)), yb] -= 1.0
    delta /= len(yb)
    grads: Layers = []
    for i in range(len(layers) - 1, -1, -1):
        grads.append((acts[i].T @ delta, delta.sum(axis=0)))
        if i:
            delta = (delta @ layers[i][0].T) * (acts[i] > 0)
    return grads[::-1]


def train_local(layers: Layers, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float,
                batch_size: int, mu: float = 0.0, seed: int = 0,
                check_stop: Callable[[], None] | None = None) -> TrainResult:
    """Mini-batch SGD for `epochs` passes over (x, y); with mu > 0 the FedProx proximal term
    mu/2·||w - w_global||² pulls every step towards the weights it started from. `check_stop` is
    called before every mini-batch: what it raises ends the training (a round's deadline, say)."""
    start = [(w.astype(np.float32), b.astype(np.float32)) for w, b in layers]
    current = [(w.copy(), b.copy()) for w, b in start]
    loss_before = cross_entropy(start, x, y)
    rng = np.random.default_rng(seed)
    batch_size = max(1, min(batch_size, len(y)))
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for lo in range(0, len(y), batch_size):
            if check_stop is not None:
                check_stop()
            idx = order[lo:lo + batch_size]
            grads = _gradients(current, x[idx], y[idx])
            current = [
                (w - lr * (gw + mu * (w - w0)), b - lr * (gb + mu * (b - b0)))
                for (w, b), (gw, gb), (w0, b0) in zip(current, grads, start)
            ]
    current = [(w.astype(np.float32), b.astype(np.float32)) for w, b in current]
    return TrainResult(current, cross_entropy(current, x, y), accuracy(current, x, y), loss_before)


def init_layers(sizes: tuple[int, ...], seed: int = 0) -> Layers:
    """He-initialised layers for `sizes` = (inputs, hidden..., outputs)."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(0, np.sqrt(2.0 / n_in), (n_in, n_out)).astype(np.float32),
             np.zeros(n_out, np.float32)) for n_in, n_out in zip(sizes[:-1], sizes[1:])]
