"""The held-out data a federated job's global model is evaluated on: loaded once, and evaluated on,
off the event loop."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from services.common.federated import Named, layers_from_named
from services.models import mlp_numpy

EvalData = tuple[np.ndarray, np.ndarray]


def load_eval_data() -> EvalData:
    from services.models.digits import load_split

    _, x_test, _, y_test = load_split()
    return x_test, y_test


class Evaluator:
    """Accuracy and loss of global weights on the held-out data (`load` reads it, at first use)."""

    def __init__(self, load: Callable[[], EvalData] = load_eval_data):
        self._load = load
        self._data: EvalData | None = None

    async def data(self) -> EvalData:
        if self._data is None:
            self._data = await asyncio.to_thread(self._load)
        return self._data

    async def evaluate(self, weights: Named) -> tuple[float, float]:
        x, y = await self.data()
        layers = layers_from_named(weights)
        return await asyncio.to_thread(
            lambda: (mlp_numpy.accuracy(layers, x, y), mlp_numpy.cross_entropy(layers, x, y)))
