"""Federated rounds <-> protobuf (cnei.node.v1 TrainRound): named float32 tensors as raw bytes."""
from __future__ import annotations

import numpy as np

from services.common.errors import TensorError
from services.common.federated import LocalUpdate, Named, RoundTask
from services.pb.cnei import node_pb2 as npb

DTYPE = np.dtype("<f4")


def tensors_to_proto(named: Named) -> list[npb.WeightTensor]:
    return [npb.WeightTensor(name=name, shape=list(a.shape), data=np.ascontiguousarray(a, DTYPE).tobytes())
            for name, a in named.items()]


def tensors_from_proto(tensors) -> Named:
    """Named arrays; raises TensorError when a tensor's bytes do not fill its shape."""
    named: Named = {}
    for t in tensors:
        shape = tuple(int(d) for d in t.shape)
        if any(d < 0 for d in shape):
            raise TensorError(t.name, f"negative dimension in shape {list(shape)}")
        expected = int(np.prod(shape, dtype=np.int64)) * DTYPE.itemsize
        if len(t.data) != expected:
            raise TensorError(t.name, f"shape {list(shape)} needs {expected} float32 bytes, got {len(t.data)}")
        if t.name in named:
            raise TensorError(t.name, "appears twice")
        named[t.name] = np.frombuffer(t.data, DTYPE).reshape(shape).astype(np.float32)
    return named


def task_to_proto(task: RoundTask) -> npb.TrainRoundRequest:
    return npb.TrainRoundRequest(
        job_id=task.job_id, round=task.round, model=task.model, weights=tensors_to_proto(task.weights),
        local_epochs=task.local_epochs, lr=task.lr, batch_size=task.batch_size, mu=task.mu, seed=task.seed)


def task_from_proto(msg: npb.TrainRoundRequest) -> RoundTask:
    return RoundTask(job_id=msg.job_id, round=msg.round, model=msg.model,
                     weights=tensors_from_proto(msg.weights), local_epochs=msg.local_epochs, lr=msg.lr,
                     batch_size=msg.batch_size, mu=msg.mu, seed=msg.seed)


def update_to_proto(update: LocalUpdate) -> npb.TrainRoundResult:
    return npb.TrainRoundResult(
        node_id=update.node_id, weights=tensors_to_proto(update.weights), num_samples=update.num_samples,
        loss=update.loss, accuracy=update.accuracy, seconds=update.seconds)


def update_from_proto(msg: npb.TrainRoundResult) -> LocalUpdate:
    return LocalUpdate(node_id=msg.node_id, weights=tensors_from_proto(msg.weights),
                       num_samples=msg.num_samples, loss=msg.loss, accuracy=msg.accuracy,
                       seconds=msg.seconds)
