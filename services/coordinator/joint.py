"""Edge-cloud joint inference maths: confidences, which rows to escalate, merging (pure)."""
from __future__ import annotations

import numpy as np

from services.common.errors import FailedPrecondition


def joint_scores(outputs: dict[str, np.ndarray], name: str, model: str) -> np.ndarray:
    """The output joint inference judges the rows by: FAILED_PRECONDITION when the model has no
    such output, or it is not numbers with one row per request row."""
    if name not in outputs:
        raise FailedPrecondition(f"joint inference of model '{model}' reads output '{name}', which the "
                                 f"model does not have (outputs: {sorted(outputs)})")
    scores = outputs[name]
    if scores.dtype.kind not in "iuf" or scores.ndim < 1:
        raise FailedPrecondition(f"joint inference of model '{model}' needs output '{name}' to hold numbers "
                                 f"with a batch dimension, not {scores.dtype} of shape {list(scores.shape)}")
    return scores


def only(outputs: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """The outputs a request asked for (every one when it named none)."""
    return {name: outputs[name] for name in names if name in outputs} if names else outputs


def confidences(probs: np.ndarray) -> np.ndarray:
    """Top-1 probability of each row of a [batch, classes] output (none for no rows)."""
    if not len(probs):
        return np.zeros(0)
    return np.asarray(probs, dtype=np.float64).reshape(len(probs), -1).max(axis=1)


def rows_below(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of rows whose top-1 confidence is under `threshold`."""
    return np.flatnonzero(confidences(probs) < threshold)


def prefer_edge(critical: bool, cloud_rtt_ms: float | None, latency_threshold_ms: float) -> bool:
    """Keep the edge answer: critical requests, or a cloud further away than the threshold."""
    return critical or (cloud_rtt_ms is not None and cloud_rtt_ms > latency_threshold_ms)


def answered_outputs(cloud: dict[str, np.ndarray], names: list[str], model: str,
                     cloud_model: str) -> dict[str, np.ndarray]:
    """The outputs `names` of the edge model, as the cloud model answered them: FAILED_PRECONDITION
    naming both models and the outputs the cloud model lacks."""
    missing = [name for name in names if name not in cloud]
    if missing:
        raise FailedPrecondition(f"joint inference of model '{model}': cloud model '{cloud_model}' has no output "
                                 f"{missing} (its outputs: {sorted(cloud)})")
    return {name: cloud[name] for name in names}


def merge_rows(edge: dict[str, np.ndarray], cloud: dict[str, np.ndarray], rows: np.ndarray,
               model: str, cloud_model: str) -> dict[str, np.ndarray]:
    """Edge outputs with `rows` replaced by the cloud's answers: every edge output must be one of
    the cloud's, one row per escalated row, of the same non-batch shape and kind of value;
    FAILED_PRECONDITION naming both models and the output otherwise (never the edge's row kept)."""
    answered = answered_outputs(cloud, list(edge), model, cloud_model)
    merged = {}
    for name, array in edge.items():
        theirs = answered[name]
        if theirs.shape != (len(rows), *array.shape[1:]) or (theirs.dtype.kind in "OSU") != (array.dtype.kind in "OSU"):
            raise FailedPrecondition(
                f"joint inference of model '{model}': output '{name}' of cloud model '{cloud_model}' is "
                f"{theirs.dtype} of shape {list(theirs.shape)} for {len(rows)} escalated rows; the edge's is "
                f"{array.dtype} of shape {[len(rows), *array.shape[1:]]}")
        out = np.array(array, copy=True)
        out[rows] = theirs.astype(out.dtype, copy=False)
        merged[name] = out
    return merged


def disagreements(edge_probs: np.ndarray, cloud_probs: np.ndarray) -> np.ndarray:
    """Rows where edge and cloud pick different classes."""
    return np.flatnonzero(np.argmax(edge_probs, axis=-1) != np.argmax(cloud_probs, axis=-1))
