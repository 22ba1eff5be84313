"""Triton's classification extension: a requested output answered as its top classes, BYTES
strings "<value>:<index>[:<label>]", highest value first, instead of the tensor itself."""
from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from services.common.errors import InvalidArgument

PARAMETER = "classification"  # a requested output's parameter (tritonclient's class_count)
LABELS = "labels"  # a model's metadata: its class labels, a JSON list of strings


def class_count(output: str, parameters: Mapping[str, object]) -> int:
    """How many classes a requested output's parameters ask for (0: the tensor itself)."""
    count = parameters.get(PARAMETER, 0)
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise InvalidArgument(f"output '{output}': parameter '{PARAMETER}' must be a non-negative integer, "
                              f"not {count!r}")
    return int(count)


def labels_of(metadata: Mapping[str, str]) -> list[str]:
    """A model's class labels from its metadata ([] when it names none or not as a list)."""
    try:
        labels = json.loads(metadata.get(LABELS, "[]"))
    except ValueError:
        return []
    return [str(label) for label in labels] if isinstance(labels, list) else []


def _text(value) -> str:
    """A value as Triton writes it (C++ std::to_string: floats with six decimals)."""
    return f"{float(value):f}" if isinstance(value, (float, np.floating)) else str(int(value))


def _row_classes(row: np.ndarray, count: int, labels: list[str]) -> list[bytes]:
    order = np.argsort(-row.astype(np.float64), kind="stable")[:count]
    return [(f"{_text(row[i])}:{i}" + (f":{labels[i]}" if i < len(labels) else "")).encode() for i in order]


def requested(outputs: Mapping[str, Mapping[str, object]], placed: Mapping[str, object]) -> dict[str, int]:
    """{output: class count} of the requested outputs (name -> parameters) that ask for classes;
    INVALID_ARGUMENT for one also placed in shared memory (its strings have no fixed size)."""
    counts = {name: class_count(name, params) for name, params in outputs.items()}
    for name in placed:
        if counts.get(name):
            raise InvalidArgument(f"output '{name}': classification cannot be written into shared memory; "
                                  f"ask for it in the reply")
    return {name: count for name, count in counts.items() if count}


def top_classes(output: str, array: np.ndarray, count: int, labels: list[str], batched: bool) -> np.ndarray:
    """The `count` highest elements of each row (`batched`: rows are the first dimension; else the
    whole tensor is one), as a BYTES tensor [rows, k] (or [k]), k = min(count, elements a row)."""
    if array.dtype.kind not in "iuf":
        raise InvalidArgument(f"output '{output}': classification needs a numeric output, not one of "
                              f"dtype {array.dtype}")
    batched = batched and array.ndim > 0
    rows = array.reshape(array.shape[0], int(np.prod(array.shape[1:]))) if batched else array.reshape(1, -1)
    classes = [_row_classes(row, count, labels) for row in rows]
    width = min(count, rows.shape[1])
    result = np.empty((len(classes), width), dtype=np.object_)
    for r, strings in enumerate(classes):
        result[r, :] = strings
    return result if batched else result.reshape(width)


def classify(outputs: Mapping[str, np.ndarray], counts: Mapping[str, int], labels: list[str],
             batched: bool) -> dict[str, np.ndarray]:
    """`outputs` with those named in `counts` replaced by their top classes."""
    return {name: top_classes(name, array, counts[name], labels, batched) if name in counts else array
            for name, array in outputs.items()}
