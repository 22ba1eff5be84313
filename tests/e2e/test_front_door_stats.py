"""What the compiled front door serves adds up in Triton's statistics: requests it served by a
route the coordinator dropped meanwhile (a repository load), and requests it refused itself (a
timeout that ended in its queue), are counted like the full path counts them."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.utils as triton_utils

from services.cli import infra
from services.common.deployment import BatchingSpec, DeploymentSpec
from services.coordinator.door_process import BUILT
from services.models.digits import load_all
from tests.e2e.processes import push_digits_as, put_deployment, server_ready, start_coordinator

pytestmark = pytest.mark.skipif(not BUILT.is_file(), reason=f"front door not built ({BUILT}): make frontdoor")


def _infer(client, model: str, x: np.ndarray, **kwargs):
    tensor = triton.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], client_timeout=30, **kwargs)


def _model_stats(address: str, model: str):
    client = triton.InferenceServerClient(address)
    try:
        return client.get_inference_statistics(model).model_stats[0]
    finally:
        client.close()


def _stats(address: str, model: str):
    return _model_stats(address, model).inference_stats


def _door(mesh, model: str):
    proc, address, _, _ = start_coordinator(mesh, export_spans=False, CNEI_COORDINATOR_FRONT_DOOR="on")
    try:
        infra.wait_until(lambda: server_ready(address), 30, "the coordinator ready behind its door")
        x, _ = load_all()
        client = triton.InferenceServerClient(address)
        try:
            infra.wait_until(lambda: "cnei_front_door" in _infer(client, model, x[:1]).get_response().parameters,
                             15, "the door serving the model")
        finally:
            client.close()
    except BaseException:
        infra.stop(proc)
        raise
    time.sleep(0.5)  # the door's report of those requests is in
    return proc, address


def test_requests_served_by_a_route_dropped_meanwhile_are_counted(mesh, digits_models):
    model = push_digits_as(mesh, digits_models, "stats-dropped-routes")
    proc, address = _door(mesh, model)
    x, _ = load_all()
    try:
        before = _stats(address, model).success.count
        stop, answered = threading.Event(), [0]

        def load():
            client = triton.InferenceServerClient(address)
            try:
                while not stop.is_set():
                    _infer(client, model, x[:1])
                    answered[0] += 1
            finally:
                client.close()
        loader = threading.Thread(target=load)
        loader.start()
        control = triton.InferenceServerClient(address)
        try:
            for _ in range(6):  # a repository load drops the model's routes, the door's too
                time.sleep(0.4)
                control.load_model(model)
        finally:
            control.close()
            time.sleep(0.4)
            stop.set()
            loader.join()
        time.sleep(1.0)  # the door's last reports are in
        assert answered[0] > 0 and _stats(address, model).success.count - before == answered[0]
    finally:
        infra.stop(proc)


def test_requests_the_door_refuses_itself_are_counted_as_failures(mesh, digits_models):
    model = push_digits_as(mesh, digits_models, "stats-door-refusals")
    put_deployment(mesh, DeploymentSpec(model=model, batching=BatchingSpec(max_batch_size=64, max_queue_delay_us=300_000)))
    proc, address = _door(mesh, model)
    x, _ = load_all()
    client = triton.InferenceServerClient(address)
    try:
        before = _stats(address, model).fail.count
        for _ in range(5):  # 20 ms to live in a queue that holds a batch for 300 ms
            with pytest.raises(triton_utils.InferenceServerException, match="queued in the front door") as late:
                _infer(client, model, x[:1], timeout=20_000)
            assert late.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        time.sleep(0.8)
        assert _stats(address, model).fail.count - before == 5
    finally:
        client.close()
        infra.stop(proc)


def test_answers_from_the_door_s_cache_are_successes_but_not_inferences(mesh, digits_models):
    """Triton: inference_count does not include cache hits."""
    model = push_digits_as(mesh, digits_models, "stats-door-cache")
    put_deployment(mesh, DeploymentSpec(model=model, response_cache=True))
    proc, address = _door(mesh, model)
    x, _ = load_all()
    client = triton.InferenceServerClient(address)
    try:
        def door_hit() -> bool:
            params = _infer(client, model, x[3:4]).get_response().parameters
            return "cnei_front_door" in params and "cnei_response_cache" in params
        infra.wait_until(door_hit, 10, "an answer from the door's cache")
        time.sleep(0.5)
        before = _model_stats(address, model)
        for _ in range(10):
            _infer(client, model, x[3:4])
        time.sleep(0.6)
        after = _model_stats(address, model)
        assert after.inference_stats.cache_hit.count - before.inference_stats.cache_hit.count == 10
        assert after.inference_stats.success.count - before.inference_stats.success.count == 10
        assert after.inference_count == before.inference_count
    finally:
        client.close()
        infra.stop(proc)
