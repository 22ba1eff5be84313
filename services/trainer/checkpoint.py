"""A federated job's state between rounds as bytes: the global weights and the server optimiser's
velocity (FedAvgM), so a trainer that takes the job over goes on where the last one stopped."""
from __future__ import annotations

import io

import numpy as np

from services.common.errors import InvalidArgument
from services.common.federated import Named

_WEIGHT, _VELOCITY = "w/", "v/"


def encode(weights: Named, velocity: Named | None = None) -> bytes:
    arrays = {_WEIGHT + name: value for name, value in weights.items()}
    arrays.update({_VELOCITY + name: value for name, value in (velocity or {}).items()})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode(data: bytes) -> tuple[Named, Named | None]:
    """(weights, velocity or None) from `encode`'s bytes."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidArgument(f"unreadable federated checkpoint: {exc}") from None
    weights = {k[len(_WEIGHT):]: v for k, v in arrays.items() if k.startswith(_WEIGHT)}
    velocity = {k[len(_VELOCITY):]: v for k, v in arrays.items() if k.startswith(_VELOCITY)}
    if not weights:
        raise InvalidArgument("federated checkpoint holds no weights")
    return weights, velocity or None
