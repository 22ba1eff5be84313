"""A runtime process stopped with SIGTERM while it trains a federated round exits promptly: the
round ends at its next mini-batch (UNAVAILABLE to the trainer), and the training thread with it."""
from __future__ import annotations

import signal
import subprocess
import threading
import time

import grpc

from services.cli import infra
from services.common.federated import RoundTask, layers_to_named
from services.common.federated_convert import task_to_proto
from services.models import mlp_numpy
from services.pb.cnei import node_pb2_grpc as npb_grpc
from tests.edge_runtime.processes import start_runtime


def _round(epochs: int):
    weights = layers_to_named(mlp_numpy.init_layers((64, 16, 10), seed=0))
    return task_to_proto(RoundTask(job_id="j", round=1, model="digits", weights=weights, local_epochs=epochs))


def _train_in_background(stub, epochs: int, timeout: float) -> dict:
    """Start one TrainRound on a thread; the dict gets its status code once it ends."""
    outcome: dict = {}

    def call() -> None:
        try:
            stub.TrainRound(_round(epochs), timeout=timeout)
            outcome["code"] = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            outcome["code"] = exc.code()
    threading.Thread(target=call, daemon=True).start()
    return outcome


def test_a_runtime_stopped_mid_training_exits_within_seconds_and_the_round_is_unavailable(
        registry, nats_server, redis_server, tmp_path):
    proc, address = start_runtime(registry, nats_server, redis_server, tmp_path / "cache")
    channel = grpc.insecure_channel(address)
    try:
        stub = npb_grpc.NodeControlStub(channel)
        stub.TrainRound(_round(1), timeout=60)  # the shard is loaded: the next round trains at once
        outcome = _train_in_background(stub, 2**31 - 1, timeout=600)
        time.sleep(1.0)
        assert "code" not in outcome  # still training
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            code = None
        took = time.monotonic() - started
        infra.wait_until(lambda: "code" in outcome, 5, "the round's answer")
    finally:
        channel.close()
        infra.stop(proc)
    assert code == 0 and took < 5, (code, took)
    assert outcome["code"] == grpc.StatusCode.UNAVAILABLE
