"""The baseline scheduler policies through the compiled front door choose a node per request, as
the full path does (not one node per route lifetime): round_robin and random spread sequential
requests over every node, least_loaded sends a request to an idle node while another is busy, and
passes over a node other clients keep busy, by the full path's measure (requests in flight at the
node by its heartbeat, plus rows sent it, per CPU)."""
from __future__ import annotations

import asyncio
import collections
import re
import threading
import time
import urllib.request

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from services.cli import infra
from services.cli.up import RUNTIMES
from services.common.deployment import BatchingSpec, DeploymentSpec, SchedulerSpec
from services.common.registry_client import RegistryClient
from services.coordinator.door_process import BUILT
from services.pb.inference import grpc_service_pb2 as pb
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.e2e.processes import Load, Workers, answered_by_door, door_requests, push_digits_as, put_deployment
from tests.e2e.processes import rest_json, server_ready
from tests.e2e.processes import start_coordinator, start_door
from tests.e2e.processes import start_fast_runtime

pytestmark = pytest.mark.skipif(not BUILT.is_file(), reason=f"front door not built ({BUILT}): make frontdoor")
MESH_NODES = {node_id for node_id, _, _ in RUNTIMES}  # cloud-1, edge-a1, edge-b1


@pytest.fixture(scope="module")
def steady_door(mesh):
    """Routes kept for 5 s: a route that named one node would serve every request of a test."""
    proc, address, _ = start_door(mesh, CNEI_COORDINATOR_ROUTE_TTL_MS="5000")
    try:
        yield address
    finally:
        infra.stop(proc)


def _deploy(mesh, digits_models, policy: str) -> str:
    """A model of its own deployed under `policy` over every node of the mesh (edge and cloud)."""
    model = push_digits_as(mesh, digits_models, f"digits-{policy.replace('_', '-')}")
    put_deployment(mesh, DeploymentSpec(model=model, scheduler=SchedulerSpec(policy=policy)))
    time.sleep(1.0)  # the coordinator's catalog sees the deployment
    return model


def _sequential(address: str, model: str, count: int) -> collections.Counter:
    """`count` one-row requests one after another: how many each (node, answered by the door) served."""
    client = triton.InferenceServerClient(address)
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
    served = collections.Counter()
    try:
        for _ in range(count):
            params = client.infer(model, [tensor], client_timeout=30).get_response().parameters
            served[(params["cnei_node"].string_param,
                    "cnei_front_door" in params and params["cnei_front_door"].bool_param)] += 1
    finally:
        client.close()
    return served


def _warm(address: str, model: str) -> None:
    """The door learns the route and every node loads the model (on the full path meanwhile)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if all(door for _, door in _sequential(address, model, 12)):
            return
        time.sleep(0.2)


@pytest.mark.parametrize("policy", ["round_robin", "random"])
def test_sequential_requests_under_a_baseline_policy_are_spread_over_every_node_by_the_door(
        steady_door, mesh, digits_models, policy):
    model = _deploy(mesh, digits_models, policy)
    _warm(steady_door, model)
    served = _sequential(steady_door, model, 30)
    by_node = collections.Counter({node: n for (node, _), n in served.items()})
    assert all(door for _, door in served), f"not all answered by the door: {dict(served)}"
    assert set(by_node) >= MESH_NODES, f"one route lifetime went to {dict(by_node)}"
    if policy == "round_robin":  # turns: as even as the count allows
        assert max(by_node.values()) - min(by_node.values()) <= 1, f"uneven turns: {dict(by_node)}"


def test_least_loaded_through_the_door_sends_requests_to_an_idle_node_while_another_is_busy(
        steady_door, mesh, digits_models):
    model = _deploy(mesh, digits_models, "least_loaded")
    _warm(steady_door, model)
    with Load(steady_door, threads=6, region="", model=model) as load:
        time.sleep(2.0)
    assert load.errors == [], f"failed requests: {load.errors[:3]}"
    served = collections.Counter(node for _, _, node in load.results)
    assert set(served) >= MESH_NODES, f"busy nodes were not passed over: {dict(served)}"


HEAVY, HEAVY_WIDTH = "heavy-matmul", 2048  # ~4M multiply-adds a row: over a runtime's inline limit, so batched


def _push_heavy(mesh, tmp_path) -> None:
    weights = np.random.default_rng(0).standard_normal((HEAVY_WIDTH, HEAVY_WIDTH)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "w"], ["output"])], HEAVY,
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", HEAVY_WIDTH])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", HEAVY_WIDTH])],
                              [numpy_helper.from_array(weights, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "heavy.onnx")

    async def push():
        client = RegistryClient(mesh.registry)
        try:
            await client.push_file(tmp_path / "heavy.onnx", HEAVY, "1", "FP32", {"max_batch_size": "64"})
        finally:
            await client.close()
    asyncio.run(push())


class Waiting(Workers):
    """Clients of a runtime's own keeping `threads` requests in flight there: one-row HEAVY
    requests, each waiting out the runtime's batch queue delay (little CPU, a steady count)."""

    def __init__(self, address: str, threads: int):
        super().__init__(threads)
        self.address, self.answered = address, 0

    def _run(self, index: int) -> None:
        client = triton.InferenceServerClient(self.address)
        tensor = triton.InferInput("input", [1, HEAVY_WIDTH], "FP32")
        tensor.set_data_from_numpy(np.ones((1, HEAVY_WIDTH), np.float32))
        try:
            while not self._stop.is_set():
                client.infer(HEAVY, [tensor], client_timeout=60)
                self.answered += 1
        finally:
            client.close()


def _served_by(address: str, model: str, seconds: float) -> collections.Counter:
    with Load(address, threads=6, region="", model=model) as load:
        time.sleep(seconds)
    assert load.errors == [], f"failed requests: {load.errors[:3]}"
    return collections.Counter(node for _, _, node in load.results)


def test_least_loaded_through_the_door_passes_over_a_node_other_clients_keep_busy_as_the_full_path_does(
        mesh, digits_models, tmp_path):
    """A node whose own clients keep 12 requests in flight there (its heartbeat says so) answers
    the door's requests as fast as any: by requests queued and in flight at the door alone it got
    its share of them (a third); by the full path's measure next to none while the others have fewer."""
    model = _deploy(mesh, digits_models, "least_loaded")
    _push_heavy(mesh, tmp_path)
    busy, busy_address, _ = start_fast_runtime(mesh, "edge-0-busy", "site-busy", tmp_path,  # listed first of the rest
                                               CNEI_RUNTIME_BATCH_QUEUE_DELAY_US="400000")
    door, door_address, _ = start_door(mesh)
    plain, plain_address, _, _ = start_coordinator(mesh, CNEI_COORDINATOR_FRONT_DOOR="off")
    try:
        infra.wait_until(lambda: server_ready(plain_address), 30, "the coordinator without a door ready")
        direct = triton.InferenceServerClient(busy_address)
        tensor = triton.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
        direct.infer(model, [tensor], client_timeout=30)  # loaded there: it answers the door at once
        direct.close()
        with Waiting(busy_address, threads=12) as waiting:
            infra.wait_until(lambda: waiting.answered >= 12, 60, "the busy node's own clients answered once")
            time.sleep(1.0)  # its heartbeats say how many it holds
            _warm(door_address, model)
            by_door = _served_by(door_address, model, 3.0)
            by_full_path = _served_by(plain_address, model, 3.0)
    finally:
        infra.stop(plain)
        infra.stop(door)
        infra.stop(busy)
    for served in (by_door, by_full_path):
        assert set(served) - {"edge-0-busy"} >= MESH_NODES, f"not spread over the idle nodes: {dict(served)}"
    assert by_full_path["edge-0-busy"] <= 0.1 * sum(by_full_path.values()), dict(by_full_path)
    assert by_door["edge-0-busy"] <= 0.1 * sum(by_door.values()), dict(by_door)


class Requests(Workers):
    """Closed-loop one-row requests for `model` with `parameters` from several threads: who served
    each (`cnei_node`), and the failures by status code."""

    def __init__(self, address: str, model: str, threads: int, **parameters):
        super().__init__(threads)
        self.address, self.model, self.parameters = address, model, parameters
        self.served: collections.Counter[str] = collections.Counter()
        self.failed: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def _run(self, index: int) -> None:
        client = triton.InferenceServerClient(self.address)
        tensor = triton.InferInput("input", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
        try:
            while not self._stop.is_set():
                try:
                    reply = client.infer(self.model, [tensor], parameters=self.parameters, client_timeout=30)
                    node = reply.get_response().parameters["cnei_node"].string_param
                    with self._lock:
                        self.served[node] += 1
                except InferenceServerException as exc:
                    with self._lock:
                        self.failed[str(exc.status())] += 1
        finally:
            client.close()


class Cancelling(Workers):
    """Requests for `model` with `parameters` that their clients cancel soon after sending them:
    most while queued in the door, some while their batch is at the node."""

    def __init__(self, address: str, model: str, threads: int, **parameters: str):
        super().__init__(threads)
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
        request.raw_input_contents.append(np.ones((1, 64), np.float32).tobytes())
        for name, value in parameters.items():
            request.parameters[name].string_param = value
        self.address, self.request, self.cancelled = address, request, 0

    def _run(self, index: int) -> None:
        with grpc.insecure_channel(self.address) as channel:
            infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            while not self._stop.is_set():
                call = infer.future(self.request, timeout=30)
                time.sleep(0.002)
                if call.cancel():
                    self.cancelled += 1


def _deploy_least_loaded(mesh, digits_models, name: str, batching: BatchingSpec | None = None) -> str:
    model = push_digits_as(mesh, digits_models, name)
    put_deployment(mesh, DeploymentSpec(model=model, scheduler=SchedulerSpec(policy="least_loaded"),
                                        batching=batching or BatchingSpec()))
    return model


def _deploy_two_models(mesh, digits_models) -> tuple[str, str]:
    """Model A, its batches one row and one at a time (a load on it waits in the door's queue, not at
    the node, whose heartbeat then hardly shows it), and model B, both least_loaded over every node."""
    heavy = _deploy_least_loaded(mesh, digits_models, "digits-rows-a", BatchingSpec(max_batch_size=1))
    light = _deploy_least_loaded(mesh, digits_models, "digits-rows-b")
    time.sleep(1.0)  # the coordinator's catalog sees the deployments
    return heavy, light


def _door_answers(address: str, model: str, **parameters: str) -> None:
    """Waits until the door answers `model`'s requests itself (its routes known, the nodes loaded)."""
    client = triton.InferenceServerClient(address)
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
    try:
        infra.wait_until(lambda: all(answered_by_door(client.infer(model, [tensor], parameters=parameters,
                                                                   client_timeout=30)) for _ in range(12)),
                         30, f"the door answering {model}")
    finally:
        client.close()


def _busy_cloud_then(address: str, heavy: str, spread):
    """Twelve clients keep `heavy` (tier=cloud) busy on the cloud node through `address`; a second
    after they start, `spread()`'s clients run for three seconds: (heavy's clients, spread's)."""
    with Requests(address, heavy, threads=12, tier="cloud") as on_cloud:
        time.sleep(1.0)
        with spread() as others:
            time.sleep(3.0)
    return on_cloud, others


def _assert_the_busy_cloud_passed_over(on_cloud, spread) -> None:
    """Every request answered, the heavy ones by the cloud node, the others by both edges and at
    most a tenth by the busy cloud node."""
    assert set(on_cloud.served) == {"cloud-1"}, dict(on_cloud.served)
    assert not on_cloud.failed and not spread.failed, (dict(on_cloud.failed), dict(spread.failed))
    assert set(spread.served) >= {"edge-a1", "edge-b1"}, dict(spread.served)
    assert spread.served["cloud-1"] <= 0.1 * sum(spread.served.values()), dict(spread.served)


def test_least_loaded_through_the_door_weighs_every_models_rows_at_a_node(mesh, digits_models):
    """Model A's load, held to the cloud node (tier=cloud), keeps about a dozen rows of the door's
    queued there; model B, least_loaded over every node, then goes to the other nodes, as the full
    path counts its rows at a node across models. Before, the door weighed only B's own rows there
    and sent the cloud node its share of B (a fifth to a third)."""
    heavy, light = _deploy_two_models(mesh, digits_models)
    door, address, _ = start_door(mesh)
    try:
        _door_answers(address, heavy, tier="cloud")
        _door_answers(address, light)
        on_cloud, spread = _busy_cloud_then(address, heavy, lambda: Requests(address, light, threads=6))
    finally:
        infra.stop(door)
    _assert_the_busy_cloud_passed_over(on_cloud, spread)


def _node_rows(metrics_port: int, name: str = "cnei_front_door_node_rows") -> dict[str, float]:
    """The coordinator's `name` per node: the door's rows there by its last report (or the rows its
    routes still held when they ended: counting errors)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {node: float(rows) for node, rows in re.findall(rf'^{name}{{node="([^"]+)"}} (\S+)', text, re.M)}


def test_the_doors_rows_per_node_return_to_zero_after_load_cancellations_timeouts_and_a_node_failure(
        mesh, digits_models, tmp_path):
    """Rows queued and in flight are counted per node while the door serves two models, cancels
    queued requests, fails requests whose timeout ends in its queue and hands a killed node's
    requests to the coordinator; once all is answered every node's count is 0 again (a count left
    over would keep least_loaded off that node for good), and no route that ended (the failed
    node's) still held rows the door had to give back."""
    heavy, light = _deploy_two_models(mesh, digits_models)
    victim, _, _ = start_fast_runtime(mesh, "edge-rows-victim", "site-victim", tmp_path)
    door, address, metrics_port = start_door(mesh)
    busiest: collections.Counter[str] = collections.Counter()
    try:
        _door_answers(address, heavy, tier="cloud")
        _door_answers(address, light)
        with Requests(address, heavy, threads=8, tier="cloud"), Requests(address, light, threads=6) as spread, \
                Requests(address, heavy, threads=3, tier="cloud", timeout_us=300) as expiring, \
                Cancelling(address, heavy, threads=3, tier="cloud") as cancelling:
            for second in range(4):
                if second == 2:
                    victim.kill()
                started = time.monotonic()
                while time.monotonic() - started < 1.0:
                    for node, rows in _node_rows(metrics_port).items():
                        busiest[node] = max(busiest[node], int(rows))
                    time.sleep(0.05)
        settled = infra.wait_until(lambda: (rows := _node_rows(metrics_port)) and not any(rows.values()) and rows,
                                   15, "every node's rows back to 0")
        handed_over = door_requests(metrics_port, light, "handed_over")
        given_back = _node_rows(metrics_port, "cnei_front_door_node_rows_given_back")
    finally:
        infra.stop(door)
        infra.stop(victim)
    assert spread.served["edge-rows-victim"] > 0 and handed_over > 0, (dict(spread.served), handed_over)  # it failed
    assert expiring.failed["StatusCode.DEADLINE_EXCEEDED"] > 0 and cancelling.cancelled > 0
    assert busiest["cloud-1"] >= 4 and set(busiest) >= MESH_NODES | {"edge-rows-victim"}, dict(busiest)
    assert set(settled) == set(busiest), settled
    assert given_back == dict.fromkeys(settled, 0.0), f"rows left counted by routes that ended: {given_back}"


class RestRequests(Workers):
    """Closed-loop one-row REST requests for `model` from several threads (REST always takes the
    coordinator's Python path): who served each (`cnei_node`), and the failures by HTTP status."""

    def __init__(self, url: str, model: str, threads: int):
        super().__init__(threads)
        self.url, self.model = url, model
        self.served: collections.Counter[str] = collections.Counter()
        self.failed: collections.Counter[int] = collections.Counter()
        self._lock = threading.Lock()

    def _run(self, index: int) -> None:
        body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [1.0] * 64}]}
        while not self._stop.is_set():
            status, reply = rest_json(f"{self.url}/v2/models/{self.model}/infer", "POST", body, timeout=30)
            with self._lock:
                if status == 200:
                    self.served[reply["parameters"]["cnei_node"]] += 1
                else:
                    self.failed[status] += 1


def test_the_full_paths_least_loaded_passes_over_a_node_the_door_keeps_busy(mesh, digits_models):
    """Model A's load through the door, held to the cloud node (tier=cloud), keeps about a dozen
    rows queued in the door there, which the node's heartbeat hardly shows; model B's REST requests
    (the coordinator's Python path, least_loaded over every node) then go to the other nodes, as
    the coordinator weighs the rows the door reports beside its own. Before, it counted only its
    own rows and sent the cloud node its share of B."""
    heavy, light = _deploy_two_models(mesh, digits_models)
    door, address, http_port, _ = start_coordinator(mesh, export_spans=False, CNEI_COORDINATOR_FRONT_DOOR="on")
    url = f"http://127.0.0.1:{http_port}"
    try:
        infra.wait_until(lambda: server_ready(address), 30, "the coordinator ready behind its door")
        _door_answers(address, heavy, tier="cloud")
        with RestRequests(url, light, threads=6) as warming:  # every node loads B
            infra.wait_until(lambda: set(warming.served) >= MESH_NODES, 30, f"every node serving {light}")
        on_cloud, spread = _busy_cloud_then(address, heavy, lambda: RestRequests(url, light, threads=6))
    finally:
        infra.stop(door)
    _assert_the_busy_cloud_passed_over(on_cloud, spread)
