"""Deterministic, disjoint partitions of a training set across federated nodes (IID or label skew)."""
from __future__ import annotations

import numpy as np

MODES = ("iid", "label_skew")
SEED = 0


def shard_indices(labels: np.ndarray, index: int, count: int, mode: str = "iid",
                  seed: int = SEED) -> np.ndarray:
    """Row indices of shard `index` of `count`. `iid`: a seeded shuffle cut into equal parts.
    `label_skew`: rows sorted by label cut into 2·count slices, shard i taking slices i and
    i + count, so each node sees few labels (McMahan et al.'s pathological non-IID split)."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside 0..{count - 1}")
    if mode not in MODES:
        raise ValueError(f"shard mode {mode!r} is not one of {MODES}")
    order = np.random.default_rng(seed).permutation(len(labels))
    if mode == "iid":
        return np.sort(np.array_split(order, count)[index])
    by_label = order[np.argsort(labels[order], kind="stable")]
    slices = np.array_split(by_label, 2 * count)
    return np.sort(np.concatenate([slices[index], slices[index + count]]))
