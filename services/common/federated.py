"""Federated-round domain types and the named-weights <-> layers checks both sides share."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidArgument, TensorError

Layers = list[tuple[np.ndarray, np.ndarray]]
Named = dict[str, np.ndarray]


@dataclass(frozen=True)
class RoundTask:
    """What the trainer asks of one node in one round."""

    job_id: str
    round: int
    model: str
    weights: Named
    local_epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    mu: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class LocalUpdate:
    """What a node answers: its locally trained weights and how they were obtained."""

    node_id: str
    weights: Named
    num_samples: int
    loss: float
    accuracy: float
    seconds: float


def layers_to_named(layers: Layers) -> Named:
    named: Named = {}
    for i, (w, b) in enumerate(layers):
        named[f"W{i}"], named[f"B{i}"] = w, b
    return named


def layers_from_named(named: Named, in_dim: int | None = None, out_dim: int | None = None) -> Layers:
    """W0, B0, W1, B1, ... as layers; raises InvalidArgument unless they chain into a dense MLP
    (optionally with `in_dim` inputs and `out_dim` outputs)."""
    count = len(named) // 2
    expected = {f"{p}{i}" for i in range(count) for p in "WB"}
    if not named or set(named) != expected:
        raise InvalidArgument(f"weights must be W0, B0, ... W{max(count - 1, 0)}, B{max(count - 1, 0)}; "
                              f"got {sorted(named)}")
    layers = [(named[f"W{i}"], named[f"B{i}"]) for i in range(count)]
    width = in_dim
    for i, (w, b) in enumerate(layers):
        if w.ndim != 2:
            raise TensorError(f"W{i}", f"expected 2 dimensions, got shape {list(w.shape)}")
        if width is not None and w.shape[0] != width:
            raise TensorError(f"W{i}", f"expected {width} rows, got shape {list(w.shape)}")
        if b.shape != (w.shape[1],):
            raise TensorError(f"B{i}", f"expected shape [{w.shape[1]}], got {list(b.shape)}")
        width = w.shape[1]
    if out_dim is not None and width != out_dim:
        raise TensorError(f"W{count - 1}", f"expected {out_dim} outputs, got {width}")
    return layers


def non_finite_tensors(weights: Named) -> list[str]:
    """The names of the tensors holding NaN or infinite values, sorted."""
    return [name for name, tensor in sorted(weights.items()) if not np.isfinite(tensor).all()]


def check_same_shapes(reference: Named, other: Named, who: str) -> None:
    """Raise InvalidArgument unless `other` has exactly the tensors and shapes of `reference`."""
    if set(other) != set(reference):
        raise InvalidArgument(f"{who}: tensors {sorted(other)} differ from {sorted(reference)}")
    for name, ref in reference.items():
        if other[name].shape != ref.shape:
            raise TensorError(name, f"{who}: shape {list(other[name].shape)} differs from {list(ref.shape)}")


def named_bytes(named: Named) -> int:
    return sum(int(a.nbytes) for a in named.values())
