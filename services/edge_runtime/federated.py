"""Federated participation: this node's local data shard and local training rounds, off the loop."""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from opentelemetry import trace

from services.common.errors import Cancelled, DeadlineExceeded, InvalidArgument, NotFound, Unavailable
from services.common.federated import LocalUpdate, RoundTask, layers_from_named, layers_to_named, non_finite_tensors
from services.edge_runtime.settings import RuntimeSettings
from services.models import mlp_numpy
from services.models.shards import shard_indices

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)
Shard = tuple[np.ndarray, np.ndarray]
DIGITS_FEATURES, DIGITS_CLASSES = 64, 10


def digits_shard(index: int, count: int, mode: str) -> Shard:
    """This node's part of the digits training split (the test split stays with the trainer)."""
    from services.models.digits import load_split

    x_train, _, y_train, _ = load_split()
    rows = shard_indices(y_train, index, count, mode)
    return x_train[rows], y_train[rows]


# Datasets this runtime holds a shard of: family -> (features, classes). A model belongs to the
# family named like it or as its prefix ("digits", "digits-tiny", "digits-fl", ...).
DATASETS = {"digits": (DIGITS_FEATURES, DIGITS_CLASSES)}


def dataset_of(model: str) -> str:
    """The dataset family of `model`; NotFound when this node holds no data for it."""
    family = model.split("-", 1)[0]
    if family not in DATASETS:
        raise NotFound(f"no local training data for model '{model}' (datasets: {sorted(DATASETS)})")
    return family


def check_task(task: RoundTask) -> None:
    """Raise NotFound / InvalidArgument for a round this node cannot train."""
    family = dataset_of(task.model)
    # written so that NaN (for which every comparison is false) fails them too
    if not (task.local_epochs >= 1 and task.batch_size >= 1 and 0 < task.lr < math.inf and 0 <= task.mu < math.inf):
        raise InvalidArgument(f"local_epochs and batch_size must be >= 1, lr > 0 and mu >= 0 (finite); got "
                              f"{task.local_epochs}, {task.batch_size}, {task.lr}, {task.mu}")
    features, classes = DATASETS[family]
    layers_from_named(task.weights, features, classes)
    if bad := non_finite_tensors(task.weights):
        raise InvalidArgument(f"global weights {bad} hold NaN or infinite values")


class RoundBound:
    """What ends a local round before its epochs are done, checked by its training thread before
    every mini-batch: the round's deadline passing, its call cancelled, the node shutting down."""

    def __init__(self, task: RoundTask, node_id: str, timeout: float | None, closing: threading.Event):
        self.round = f"job {task.job_id} round {task.round}"
        self.node_id = node_id
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.closing = closing
        self.cancelled = threading.Event()

    def check(self) -> None:
        """Raise the CneiError that ends the round now, if one does."""
        if self.closing.is_set():
            raise Unavailable(f"node {self.node_id} is shutting down: {self.round} stopped")
        if self.cancelled.is_set():
            raise Cancelled(f"{self.round} was cancelled by its caller: training stopped")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceeded(f"{self.round} passed its deadline: training stopped")


class LocalTrainer:
    """Trains global weights on the node's shard; CPU work runs in its own thread pool, each round
    bounded by its deadline, its call and the node's life (RoundBound)."""

    def __init__(self, settings: RuntimeSettings, load_shard: Callable[[int, int, str], Shard] = digits_shard):
        self.settings = settings
        self._load_shard = load_shard
        self._shard: Shard | None = None
        self._executor = ThreadPoolExecutor(settings.train_workers, thread_name_prefix="train")
        self._closing = threading.Event()

    def shard(self) -> Shard:
        if self._shard is None:
            s = self.settings
            self._shard = self._load_shard(s.shard_index, s.shard_count, s.shard_mode)
            log.info("local shard %d/%d (%s): %d samples", s.shard_index, s.shard_count, s.shard_mode,
                     len(self._shard[1]))
        return self._shard

    def _train(self, task: RoundTask, bound: RoundBound) -> LocalUpdate:
        start = time.perf_counter()
        bound.check()  # a round that waited for the thread past its deadline is not begun
        x, y = self.shard()
        try:
            result = mlp_numpy.train_local(
                layers_from_named(task.weights), x, y, epochs=task.local_epochs, lr=task.lr,
                batch_size=task.batch_size, mu=task.mu, seed=task.seed, check_stop=bound.check)
        except (Unavailable, Cancelled, DeadlineExceeded) as exc:
            log.warning("%s after %.2fs", exc, time.perf_counter() - start)
            raise
        return LocalUpdate(node_id=self.settings.node_id, weights=layers_to_named(result.layers),
                           num_samples=len(y), loss=result.loss, accuracy=result.accuracy,
                           seconds=time.perf_counter() - start)

    async def train_round(self, task: RoundTask, timeout: float | None = None) -> LocalUpdate:
        """One local round; training stops at the next mini-batch once `timeout` seconds have
        passed (DEADLINE_EXCEEDED), this call is cancelled or the node stops (UNAVAILABLE)."""
        check_task(task)
        bound = RoundBound(task, self.settings.node_id, timeout, self._closing)
        bound.check()
        with _tracer.start_as_current_span("federated.local_train") as span:
            span.set_attributes({"cnei.job": task.job_id, "cnei.round": task.round, "cnei.model": task.model,
                                 "cnei.node": self.settings.node_id})
            try:
                update = await asyncio.get_running_loop().run_in_executor(self._executor, self._train, task, bound)
            except asyncio.CancelledError:  # the call was cancelled, or its deadline passed
                bound.cancelled.set()
                raise
            span.set_attributes({"cnei.samples": update.num_samples, "cnei.loss": update.loss})
        log.info("job %s round %d: trained on %d samples in %.2fs (loss %.4f, accuracy %.3f)",
                 task.job_id, task.round, update.num_samples, update.seconds, update.loss, update.accuracy)
        return update

    def stop(self) -> None:
        """End the rounds in training at their next mini-batch (UNAVAILABLE); refuse new ones."""
        self._closing.set()

    def close(self) -> None:
        """Stop, then wait for the training threads (each ends within one mini-batch)."""
        self.stop()
        self._executor.shutdown(wait=True, cancel_futures=True)
