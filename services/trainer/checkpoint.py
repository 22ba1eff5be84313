"""A federated job's state between rounds as bytes: the global weights and the server optimiser's
state (FedAvgM's velocity, FedAdam/FedYogi/FedAdagrad's moments), so a trainer that takes the job
over goes on where the last one stopped."""
from __future__ import annotations

import hashlib
import io

import numpy as np

from services.common.errors import InvalidArgument
from services.common.federated import Named

_WEIGHT, _STATE = "w/", "s/"
_LEGACY_VELOCITY = "v/"  # checkpoints written before the state slots: FedAvgM's velocity


def encode(weights: Named, state: dict[str, Named] | None = None) -> bytes:
    """`state`: the strategy's named slots (e.g. {"velocity": ...}, {"m": ..., "v": ...})."""
    arrays = {_WEIGHT + name: value for name, value in weights.items()}
    for slot, tensors in (state or {}).items():
        if "/" in slot:
            raise InvalidArgument(f"checkpoint slot '{slot}' must not contain '/'")
        arrays.update({f"{_STATE}{slot}/{name}": value for name, value in tensors.items()})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode(data: bytes) -> tuple[Named, dict[str, Named]]:
    """(weights, the strategy's state slots) from `encode`'s bytes."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidArgument(f"unreadable federated checkpoint: {exc}") from None
    weights = {k[len(_WEIGHT):]: v for k, v in arrays.items() if k.startswith(_WEIGHT)}
    if not weights:
        raise InvalidArgument("federated checkpoint holds no weights")
    state: dict[str, Named] = {}
    for key, value in arrays.items():
        if key.startswith(_STATE):
            slot, _, name = key[len(_STATE):].partition("/")
            state.setdefault(slot, {})[name] = value
        elif key.startswith(_LEGACY_VELOCITY):
            state.setdefault("velocity", {})[key[len(_LEGACY_VELOCITY):]] = value
    return weights, state


def weights_digest(weights: Named) -> str:
    """sha256 of the weights (names, dtypes, shapes and values, in name order): equal exactly when
    two trainers hold the same model."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = np.ascontiguousarray(weights[name])
        digest.update(f"{name}|{tensor.dtype.str}|{tensor.shape}|".encode())
        digest.update(tensor.tobytes())
    return digest.hexdigest()
