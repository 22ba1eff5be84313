"""The coordinator's serving path over real gRPC (tests/coordinator/mesh.py): what its breakers
make of each outcome, hedging and cancellation, where the `tier` parameter and a latency budget
let a request run, requested outputs, joint inference on awkward requests, and nodes that leave."""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import grpc
import numpy as np
import pytest

from services.cli import infra
from services.common import lifecycle, oip
from services.common.deployment import BatchingSpec, DeploymentSpec, JointSpec, PrecisionSpec, SchedulerSpec
from services.common.errors import ErrorCode, InvalidArgument, Unavailable, error_for
from services.common.model_spec import TensorSpec, ModelVariant
from services.common.nodes import NodeInfo
from services.coordinator.breaker import State
from services.pb.inference import grpc_service_pb2_grpc as pb_grpc
from tests.coordinator.mesh import NodeCore, echo, mesh, variant

X = np.ones((1, 2), np.float32)


def refusing_negatives(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if (inputs["x"] < 0).any():
        raise InvalidArgument("negative input")  # the request's own fault: the node is fine
    return echo(inputs)


# --- breakers ----------------------------------------------------------------------------------

async def cancel_the_probe(m) -> None:
    probe = m.call()
    await asyncio.sleep(0.05)  # at the node, which takes 0.2 s
    probe.cancel()
    await asyncio.sleep(0.05)


async def probe_with_a_request_the_node_refuses(m) -> None:
    assert (await m.infer(x=-X))[0] == "INVALID_ARGUMENT"


async def probe_with_a_deadline_shorter_than_the_node(m) -> None:
    assert (await m.infer(params={"timeout_us": 20_000}))[0] == "DEADLINE_EXCEEDED"


@pytest.mark.parametrize("probe", [cancel_the_probe, probe_with_a_request_the_node_refuses,
                                   probe_with_a_deadline_shorter_than_the_node],
                         ids=["client-cancels", "node-answers-invalid-argument", "clients-own-deadline"])
async def test_a_half_open_probe_that_says_nothing_against_the_node_never_leaves_it_blocked(probe):
    node = NodeCore(refusing_negatives, delay_s=0.2)
    async with mesh([variant()], {}, {"n1": node}, breaker_open_s=0.3) as m:
        m.core.breakers.get("n1").trip("earlier outage")
        await asyncio.sleep(0.35)  # the open period is over: the next call is the probe
        await probe(m)
        await asyncio.sleep(0.1)
        assert m.core.breakers.get("n1").would_allow()
        status, response = await m.infer()
        assert status == "OK" and response.parameters["cnei_node"] == "n1"
        assert m.core.breakers.get("n1").state is State.CLOSED


@pytest.mark.parametrize(
    ("spec", "params", "state"),
    [(DeploymentSpec(model="m"), {"timeout_us": 10_000}, None),
     (DeploymentSpec(model="m", attempt_timeout_ms=10), {}, State.OPEN)],
    ids=["clients-own-timeout-is-not-the-nodes-fault", "the-attempt-timeout-is"])
async def test_only_the_deployments_attempt_timeout_counts_against_a_slow_model_on_its_node(spec, params, state):
    async with mesh([variant()], {"m": spec}, {"n1": NodeCore(delay_s=0.1), "n2": NodeCore()},
                    breaker_failures=3) as m:
        m.core.outstanding["n2"] = 100  # n1 first
        for _ in range(3):
            status, answer = await m.infer(params=params)
            assert status == "DEADLINE_EXCEEDED" if params else answer.parameters["cnei_node"] == "n2"
        pair = m.core.breakers.by_model.get(("n1", "m:1:FP32"))
        assert (pair.state if pair else None) is state
        assert m.core.breakers.get("n1").state is State.CLOSED, "a slow model says nothing of its node"


async def test_a_client_timing_out_leaves_the_node_to_the_other_clients():
    async with mesh([variant()], {}, {"n1": NodeCore(delay_s=0.05)}) as m:
        for _ in range(4):
            assert (await m.infer(params={"timeout_us": 10_000}))[0] == "DEADLINE_EXCEEDED"
        status, response = await m.infer()
        assert status == "OK", response


def crashing(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    raise RuntimeError("CUDA error: an illegal memory access was encountered")  # INTERNAL: the node's own fault


async def test_a_node_failing_with_internal_is_failed_over_and_counted_towards_opening_its_breaker_of_the_model():
    spec = DeploymentSpec(model="m", scheduler=SchedulerSpec(policy="round_robin"))
    broken, sound = NodeCore(crashing), NodeCore()
    async with mesh([variant()], {"m": spec}, {"n1": broken, "n2": sound}, breaker_failures=2) as m:
        for _ in range(6):
            status, response = await m.infer()
            assert status == "OK" and response.parameters["cnei_node"] == "n2", response
        breaker = m.core.breakers.by_model[("n1", "m:1:FP32")]
        assert breaker.state is State.OPEN and "CUDA error" in breaker.reason
        assert m.core.breakers.get("n1").state is State.CLOSED, "the node answered: its other models serve on"
        assert len(broken.calls) == 2, "no call while its breaker is open"


# A model failing on a node (INTERNAL) is avoided there alone: its other models stay served.

def two_models() -> tuple[list[ModelVariant], dict[str, DeploymentSpec]]:
    """Models `good` and `bad` (mesh.variant), placed round robin."""
    round_robin = SchedulerSpec(policy="round_robin")
    return ([variant("good"), variant("bad")],
            {m: DeploymentSpec(model=m, scheduler=round_robin) for m in ("good", "bad")})


async def test_a_model_failing_on_a_node_is_avoided_there_while_its_other_models_are_still_served_there():
    variants, specs = two_models()
    broken, sound = NodeCore(failing=("bad",)), NodeCore()
    async with mesh(variants, specs, {"n1": broken, "n2": sound}, breaker_failures=2) as m:
        for _ in range(12):
            status, response = await m.infer("bad")
            assert status == "OK" and response.parameters["cnei_node"] == "n2", response
        assert broken.models == ["bad", "bad"], "bad avoids n1 once its breaker of bad opened"
        served = [(await m.infer("good"))[1].parameters["cnei_node"] for _ in range(4)]
        assert sorted(served) == ["n1", "n1", "n2", "n2"], "good is still served on n1"
        assert m.core.breakers.get("n1").state is State.CLOSED
        assert m.core.breakers.by_model[("n1", "bad:1:FP32")].state is State.OPEN


async def test_a_model_failing_everywhere_leaves_every_node_serving_the_others():
    variants, specs = two_models()
    nodes = {"n1": NodeCore(failing=("bad",)), "n2": NodeCore(failing=("bad",))}
    async with mesh(variants, specs, nodes, breaker_failures=2) as m:
        for _ in range(8):  # one client sending bad what it fails on, over and over
            assert (await m.infer("bad"))[0] in ("INTERNAL", "UNAVAILABLE")
        served = [(await m.infer("good"))[1].parameters["cnei_node"] for _ in range(4)]
        assert sorted(served) == ["n1", "n1", "n2", "n2"], "no node of the mesh is out of use for good"
        status, details = await m.infer("bad")
        assert status == "UNAVAILABLE" and "no live node can serve model 'bad'" in details
        assert "n1 (model bad:1:FP32: node n1: onnx runtime: model 'bad' cannot run here)" in details
        assert [n.models.count("bad") for n in nodes.values()] == [2, 2]


async def test_a_node_failing_every_model_ends_up_avoided_for_each():
    variants, specs = two_models()
    broken, sound = NodeCore(failing=("good", "bad")), NodeCore()
    async with mesh(variants, specs, {"n1": broken, "n2": sound}, breaker_failures=2) as m:
        for _ in range(6):
            for model in ("good", "bad"):
                status, response = await m.infer(model)
                assert status == "OK" and response.parameters["cnei_node"] == "n2", response
        assert sorted(broken.models) == ["bad", "bad", "good", "good"]
        assert {k: b.state for k, b in m.core.breakers.by_model.items()} == \
            {("n1", "good:1:FP32"): State.OPEN, ("n1", "bad:1:FP32"): State.OPEN}


class SlowModels(NodeCore):
    """A runtime stand-in taking `slow[model]` seconds over the models named there (a model
    keeping the node's cores busy), answering the others at once."""

    def __init__(self, slow: dict[str, float]):
        super().__init__()
        self.slow = slow

    async def infer(self, request: oip.InferRequest, deadline_s: float | None = None) -> oip.InferResponse:
        await asyncio.sleep(self.slow.get(request.model_name, 0.0))
        return await super().infer(request, deadline_s)


async def test_a_model_timing_out_everywhere_leaves_every_node_serving_the_others():
    variants, specs = two_models()
    specs["bad"] = replace(specs["bad"], attempt_timeout_ms=20)
    nodes = {"n1": SlowModels({"bad": 0.5}), "n2": SlowModels({"bad": 0.5})}
    async with mesh(variants, specs, nodes, breaker_failures=2) as m:
        # timing out on every node, at once (the last try waits for the client's 0.3 s)
        await asyncio.gather(*(m.infer("bad", timeout=0.3) for _ in range(6)))
        served = [(await m.infer("good"))[1].parameters["cnei_node"] for _ in range(4)]
        assert sorted(served) == ["n1", "n1", "n2", "n2"], "no node of the mesh is out of use for good"
        assert {b.state for b in m.core.breakers.by_node.values()} == {State.CLOSED}
        assert {model for _, model in m.core.breakers.by_model} == {"bad:1:FP32"}, "bad's timeouts are bad's"


async def test_a_model_fixed_on_a_node_is_served_there_again_after_one_probe():
    variants, specs = two_models()
    broken = NodeCore(failing=("bad",))
    async with mesh(variants, specs, {"n1": broken}, breaker_failures=1, breaker_open_s=0.2) as m:
        assert (await m.infer("bad"))[0] == "INTERNAL"
        status, details = await m.infer("bad")
        assert status == "UNAVAILABLE" and "model bad:1:FP32" in details and broken.models == ["bad"]
        broken.failing = ()  # the model works again
        await asyncio.sleep(0.25)
        status, response = await m.infer("bad")  # the probe
        assert status == "OK" and response.parameters["cnei_node"] == "n1"
        assert m.core.breakers.by_model == {}, "answered again: nothing kept"


class Aborting(pb_grpc.GRPCInferenceServiceServicer):
    """A node whose server fails with a gRPC code CNEI has no name for."""

    def __init__(self, code: grpc.StatusCode):
        self.code = code

    async def ModelInfer(self, request, context):
        await context.abort(self.code, "the backend lost its state")


@pytest.mark.parametrize("code", [grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS], ids=["unknown", "data-loss"])
async def test_a_node_answering_unknown_or_data_loss_is_at_fault_as_with_internal(code):
    server = lifecycle.GrpcServer("127.0.0.1", 0)
    server.add(pb_grpc.add_GRPCInferenceServiceServicer_to_server, Aborting(code), "inference.GRPCInferenceService")
    await server.start()
    try:
        async with mesh([variant()], {}, {"n1": NodeCore()}, live=(), breaker_failures=3) as m:
            m.nodes["n9"] = NodeInfo("n9", "edge", "r1", server.address, cpus=4, models=[variant().key])
            await m.leave_and_join("n9")
            status, details = await m.infer()
            assert status == "INTERNAL" and f"{code.name}: the backend lost its state" in details
            breaker = m.core.breakers.by_model[("n9", "m:1:FP32")]
            assert (breaker.state, breaker.failures) == (State.CLOSED, 1), "counted, not opened at once"
    finally:
        await server.stop(0)


async def test_hedged_requests_never_both_probe_a_half_open_node():
    node = NodeCore(delay_s=0.2)
    async with mesh([variant()], {"m": DeploymentSpec(model="m", hedge_after_ms=50)}, {"n1": node},
                    breaker_open_s=0.1) as m:
        m.core.breakers.get("n1").trip("earlier outage")
        await asyncio.sleep(0.15)
        results = await asyncio.gather(*(m.core.infer(oip.InferRequest("m", {"x": X})) for _ in range(2)),
                                       return_exceptions=True)
        failed = [r for r in results if isinstance(r, Exception)]
        assert len(node.calls) == 1, "one probe at a time"
        assert len(failed) == 1 and isinstance(failed[0], Unavailable) and "n1" in failed[0].message


# --- batches, hedging, cancellation ------------------------------------------------------------

async def test_a_batch_whose_answer_cannot_be_split_fails_its_callers_at_once_counted_once_against_the_node():
    reduce_all = lambda inputs: {"y": np.asarray(inputs["x"].sum(), np.float32)}  # noqa: E731
    spec = DeploymentSpec(model="m", batching=BatchingSpec(max_batch_size=8, max_queue_delay_us=50_000),
                          attempt_timeout_ms=5000)
    async with mesh([variant(outputs=(("y", "FP32", ()),))], {"m": spec}, {"n1": NodeCore(reduce_all)}) as m:
        start = time.monotonic()
        results = await asyncio.gather(m.infer(), m.infer())
        assert time.monotonic() - start < 2.0
        for status, details in results:
            assert status == "INTERNAL"
            assert "with output 'y' of shape []: it needs 2 rows" in details
        # the node's reply is malformed, as the door judges it too
        breaker = m.core.breakers.by_model[("n1", "m:1:FP32")]
        assert (breaker.state, breaker.failures) == (State.CLOSED, 1), "one failed node call"


@pytest.mark.parametrize(("node", "spec", "breaker"), [
    (NodeCore(failing=("m",)), {}, ("n1", "m:1:FP32")),
    (NodeCore(delay_s=0.5), {"attempt_timeout_ms": 150}, ("n1", "m:1:FP32")),
], ids=["faulty", "slow"])
async def test_one_failed_batch_counts_once_towards_opening_a_breaker_and_its_requests_fail_over(node, spec, breaker):
    spec = DeploymentSpec(model="m", batching=BatchingSpec(max_batch_size=8, max_queue_delay_us=50_000), **spec)
    async with mesh([variant()], {"m": spec}, {"n1": node, "n2": NodeCore()}) as m:
        m.core.outstanding["n2"] = 100  # n1 first
        results = await asyncio.gather(*(m.infer() for _ in range(3)))
        assert [(s, r.parameters["cnei_node"]) for s, r in results] == [("OK", "n2")] * 3
        assert [len(call["x"]) for call in node.calls] == [3], "one node call carried all three"
        b = m.core.breakers.by_model[breaker]
        assert (b.state, b.failures) == (State.CLOSED, 1), "breaker_failures (3) counts node calls"


@pytest.mark.parametrize("code", [ErrorCode.INVALID_ARGUMENT, ErrorCode.NOT_FOUND, ErrorCode.FAILED_PRECONDITION])
async def test_a_batch_refused_for_one_request_s_values_is_sent_again_one_by_one_so_only_that_request_fails(code):
    def gather(inputs):  # ONNX Runtime refuses the whole call: one Gather index out of range
        if (inputs["x"] < 0).any():
            raise error_for(code, "indices element out of data bounds, idx=-1")
        return echo(inputs)
    spec = DeploymentSpec(model="m", batching=BatchingSpec(max_batch_size=8, max_queue_delay_us=50_000))
    node = NodeCore(gather)
    async with mesh([variant()], {"m": spec}, {"n1": node}) as m:
        results = await asyncio.gather(m.infer(x=X), m.infer(x=-X), m.infer(x=2 * X))
        assert [status for status, _ in results] == ["OK", code.name, "OK"]
        assert results[1][1] == "indices element out of data bounds, idx=-1"
        assert results[2][1].outputs["y"].tolist() == (2 * X).tolist()
        assert [len(call["x"]) for call in node.calls] == [3, 1, 1, 1], "the batch, then each alone"
        assert m.core.breakers.get("n1").state is State.CLOSED and not m.core.breakers.by_model


@pytest.mark.parametrize("hedge_after_ms", [0, 150], ids=["no-hedging", "hedging"])
async def test_a_request_its_client_cancelled_while_queued_is_never_sent(hedge_after_ms):
    node = NodeCore(delay_s=0.4)
    async with mesh([variant()], {"m": DeploymentSpec(model="m", hedge_after_ms=hedge_after_ms)},
                    {"n1": node}) as m:
        busy = m.call(x=np.full((1, 2), 1, np.float32))  # holds the node's only batch slot
        await asyncio.sleep(0.05)
        victim = m.call(x=np.full((1, 2), 2, np.float32))
        await asyncio.sleep(0.05)
        victim.cancel()
        await busy
        await asyncio.sleep(0.6)
        assert node.markers == [1.0]
        assert m.core.outstanding == {}


async def test_a_caller_giving_up_cancels_both_hedged_copies():
    slow, slower = NodeCore(delay_s=1.0), NodeCore(delay_s=1.0)
    async with mesh([variant()], {"m": DeploymentSpec(model="m", hedge_after_ms=50)},
                    {"n1": slow, "n2": slower}) as m:
        status, _ = await m.infer(timeout=0.3)
        assert status == "DEADLINE_EXCEEDED"
        await asyncio.sleep(0.1)
        assert len(slow.calls) + len(slower.calls) == 2  # hedged
        assert m.core.outstanding == {}  # neither copy still waits for its node
        assert all(b.would_allow() for b in m.core.breakers.by_node.values())


# --- attempt limits ----------------------------------------------------------------------------

async def test_a_model_measured_slower_than_the_attempt_timeout_is_served_by_its_first_node():
    slow = variant(**{"latency_ms.edge": "40"})  # 8 rows a call: 0.64 s for two calls
    nodes = {"n1": NodeCore(delay_s=0.3), "n2": NodeCore(delay_s=0.3)}
    async with mesh([slow], {"m": DeploymentSpec(model="m", attempt_timeout_ms=50)}, nodes) as m:
        status, response = await m.infer()
        assert status == "OK", response
        assert sum(len(n.calls) for n in nodes.values()) == 1, "never cut short and run again elsewhere"
        assert m.core.breakers.by_model == {}


@pytest.mark.parametrize("cores", [{"n1": 0.3}, {"n1": 0.3, "n2": 0.3}], ids=["one-node", "two-nodes"])
async def test_the_last_node_left_to_try_is_waited_for_until_the_request_s_deadline(cores):
    nodes = {node_id: NodeCore(delay_s=delay) for node_id, delay in cores.items()}
    async with mesh([variant()], {"m": DeploymentSpec(model="m", attempt_timeout_ms=50)}, nodes,
                    fast_lane=True) as m:
        status, response = await m.infer(timeout=5.0)
        assert status == "OK", response
        assert sum(len(n.calls) for n in nodes.values()) == len(cores), "the first of two was cut short"
        for (node_id, _), breaker in m.core.breakers.by_model.items():  # the node cut short, by its id
            assert breaker.reason == f"node {node_id} did not answer model m:1:FP32 within its attempt limit of 0.050 s"


def giving_up(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    raise error_for(ErrorCode.DEADLINE_EXCEEDED, "the node's queue held it too long")


async def test_a_node_timing_out_before_the_request_s_deadline_is_unavailable_naming_it_not_deadline_exceeded():
    async with mesh([variant()], {"m": DeploymentSpec(model="m", attempt_timeout_ms=50)},
                    {"n1": NodeCore(giving_up)}, fast_lane=True) as m:
        status, details = await m.infer(timeout=5.0)
        assert (status, details) == ("UNAVAILABLE", "node n1 timed out on model m:1:FP32 before the request's "
                                                    "deadline (the node's queue held it too long)")


async def test_a_request_s_own_deadline_passing_on_its_last_node_is_deadline_exceeded():
    async with mesh([variant()], {"m": DeploymentSpec(model="m", attempt_timeout_ms=50)},
                    {"n1": NodeCore(delay_s=0.5)}, fast_lane=True) as m:
        status, details = await m.infer(timeout=0.2)
        assert status == "DEADLINE_EXCEEDED" and "127.0.0.1" not in details, details


async def test_a_node_whose_fast_lane_is_unreachable_is_named_by_its_id_not_its_address():
    async with mesh([variant()], {}, {"n1": NodeCore()}, live=(), fast_lane=True) as m:
        gone = f"127.0.0.1:{infra.free_port()}"
        m.nodes["n9"] = NodeInfo("n9", "edge", "r1", m.nodes["n1"].address, cpus=4, models=[variant().key],
                                 fast_address=gone)
        await m.leave_and_join("n9")
        status, details = await m.infer()
        assert status == "UNAVAILABLE" and details.startswith("fast lane node n9 unreachable"), details
        assert gone not in details and gone not in m.core.breakers.get("n9").reason


# --- where a request may run -------------------------------------------------------------------

@pytest.mark.parametrize(
    ("model", "tier", "expected"),
    [("cloudonly", "", "cloud"), ("cloudonly", "cloud", "cloud"), ("cloudonly", "edge", "FAILED_PRECONDITION"),
     ("edgeonly", "", "edge"), ("edgeonly", "edge", "edge"), ("edgeonly", "cloud", "FAILED_PRECONDITION"),
     ("anywhere", "edge", "edge"), ("anywhere", "cloud", "cloud")])
async def test_the_tier_parameter_only_narrows_where_a_deployment_runs(model, tier, expected):
    specs = {"cloudonly": DeploymentSpec(model="cloudonly", tiers=("cloud",)),
             "edgeonly": DeploymentSpec(model="edgeonly", tiers=("edge",), cloud_fallback=False),
             "anywhere": DeploymentSpec(model="anywhere")}
    async with mesh([variant(name) for name in specs], specs, {"e1": NodeCore(), "c1": NodeCore()},
                    tiers={"e1": "edge", "c1": "cloud"}) as m:
        status, answer = await m.infer(model, params={"tier": tier} if tier else {})
        if expected == "FAILED_PRECONDITION":
            assert status == expected
            assert f"model '{model}' is not deployed on the {tier} tier" in answer
        else:
            assert status == "OK" and answer.parameters["cnei_tier"] == expected


LATENCIES = {"accuracy": "0.95", "latency_ms.edge": "10", "latency_ms.cloud": "2"}


@pytest.mark.parametrize("hedge_after_ms", [0, 50], ids=["no-hedging", "hedging"])
async def test_a_latency_budget_only_one_node_class_meets_is_served_there(hedge_after_ms):
    async with mesh([variant(**LATENCIES)], {"m": DeploymentSpec(model="m", hedge_after_ms=hedge_after_ms)},
                    {"e1": NodeCore(), "e2": NodeCore(), "c1": NodeCore()},
                    tiers={"e1": "edge", "e2": "edge", "c1": "cloud"}) as m:
        for _ in range(3):
            status, response = await m.infer(params={"latency_budget_ms": 5})
            assert status == "OK" and response.parameters["cnei_node"] == "c1"


async def test_a_latency_budget_no_node_class_meets_is_failed_precondition_naming_each():
    async with mesh([variant(**LATENCIES)], {}, {"e1": NodeCore(), "c1": NodeCore()},
                    tiers={"e1": "edge", "c1": "cloud"}) as m:
        status, details = await m.infer(params={"latency_budget_ms": 1})
        assert status == "FAILED_PRECONDITION"
        assert "on cloud nodes (fastest measured 2.000 ms)" in details
        assert "on edge nodes (fastest measured 10.000 ms)" in details


@pytest.mark.parametrize(("params", "message"), [
    ({"accuracy_floor": 2}, "parameter 'accuracy_floor' must be from 0 to 1, got 2"),
    ({"latency_budget_ms": "-5"}, "parameter 'latency_budget_ms' must be at least 0, got '-5'")],
    ids=["floor-above-one", "negative-budget"])
@pytest.mark.parametrize("joint", ["off", "sync"])
async def test_a_floor_or_budget_out_of_its_range_is_invalid_argument_and_no_node_is_asked(params, message, joint):
    spec = DeploymentSpec(model="m", joint=JointSpec(mode=joint, output="y"))
    cores = {"e1": NodeCore(), "c1": NodeCore()}
    async with mesh([variant(**LATENCIES)], {"m": spec}, cores, tiers={"e1": "edge", "c1": "cloud"}) as m:
        assert await m.infer(params=params) == ("INVALID_ARGUMENT", message)
        assert [core.calls for core in cores.values()] == [[], []]


# --- placement and batching --------------------------------------------------------------------

def measured(precision: str, accuracy: float, latency_ms: float, name: str = "m") -> ModelVariant:
    """`variant(name)` at `precision`, of `accuracy` and `latency_ms` on edge and cloud nodes."""
    return replace(variant(name, accuracy=str(accuracy), **{f"latency_ms.{tier}": str(latency_ms)
                                                          for tier in ("edge", "cloud")}), precision=precision)


async def test_nodes_are_judged_warm_on_the_variant_the_policy_serves_not_on_fp32():
    """An accuracy floor that INT8 meets serves INT8: nodes with INT8 loaded are the warm ones,
    first for the full path and in the spread a front door is given."""
    variants = [measured("FP32", 0.98, 4.0), measured("INT8", 0.97, 1.0)]
    spec = DeploymentSpec(model="m", precision=PrecisionSpec(accuracy_floor=0.95))
    cores = {"has-fp32": NodeCore(), "has-int8-a": NodeCore(), "has-int8-b": NodeCore()}
    async with mesh(variants, {"m": spec}, cores) as m:
        m.nodes["has-fp32"].models = ["m:1:FP32"]
        m.nodes["has-int8-a"].models = m.nodes["has-int8-b"].models = ["m:1:INT8"]
        await m.leave_and_join(*cores)
        spread = m.core.place_spread(oip.InferRequest("m", {"x": X}), variants, spec, limit=3, margin=0.05)
        assert sorted((p.node.node_id, p.variant.precision) for p in spread) == \
            [("has-int8-a", "INT8"), ("has-int8-b", "INT8")]
        for _ in range(3):
            status, response = await m.infer()
            assert status == "OK", response
            assert response.parameters["cnei_precision"] == "INT8"
            assert response.parameters["cnei_node"] in ("has-int8-a", "has-int8-b")


async def test_round_robin_cycles_each_model_over_every_node_when_their_requests_interleave():
    rr = SchedulerSpec(policy="round_robin")
    specs = {"a": DeploymentSpec(model="a", scheduler=rr), "b": DeploymentSpec(model="b", scheduler=rr)}
    async with mesh([variant("a"), variant("b")], specs, {"n1": NodeCore(), "n2": NodeCore()}) as m:
        seen: dict[str, list[str]] = {"a": [], "b": []}
        for _ in range(4):
            for model in seen:
                status, response = await m.infer(model)
                assert status == "OK", response
                seen[model].append(response.parameters["cnei_node"])
        assert sorted(seen["a"]) == sorted(seen["b"]) == ["n1", "n1", "n2", "n2"]


async def test_a_preferred_batch_size_is_cut_from_more_rows_queued_while_the_node_was_busy():
    """Triton: the batcher sends the largest preferred size it can form, not only a queue of
    exactly that size; what is left waits for the queue delay."""
    spec = DeploymentSpec(model="m", batching=BatchingSpec(max_batch_size=8, max_queue_delay_us=300_000,
                                                           preferred_batch_sizes=(4,)))
    node = NodeCore(delay_s=0.1)
    async with mesh([variant()], {"m": spec}, {"n1": node}) as m:
        first = [asyncio.create_task(m.infer(x=np.full((1, 2), i, np.float32))) for i in range(4)]
        await asyncio.sleep(0.03)  # the batch of 4 is at the node for 100 ms
        second = [asyncio.create_task(m.infer(x=np.full((1, 2), i, np.float32))) for i in range(7)]
        assert all(status == "OK" for status, _ in await asyncio.gather(*first, *second))
        assert [len(call["x"]) for call in node.calls] == [4, 4, 3]


# --- requests ----------------------------------------------------------------------------------

async def test_an_output_the_model_does_not_have_is_invalid_argument_naming_it():
    async with mesh([variant()], {}, {"n1": NodeCore()}) as m:
        status, details = await m.infer(outputs=("no_such_output",))
        assert status == "INVALID_ARGUMENT"
        assert "tensor 'no_such_output': is not an output of model 'm' (outputs: ['y'])" in details


@pytest.mark.parametrize("rows", [0, 1, 3])
async def test_a_request_counts_as_many_inferences_as_it_has_rows_none_for_zero_rows(rows):
    """Triton's inference_count counts the batch size: a request of shape [0, 2] adds none."""
    async with mesh([variant()], {}, {"n1": NodeCore()}) as m:
        status, reply = await m.infer(x=np.ones((rows, 2), np.float32))
        assert status == "OK" and reply.outputs["y"].shape[0] == rows
        stats = m.core.statistics("m", "1")[0]
        assert (stats.success.count, stats.inference_count) == (1, rows)


@pytest.mark.parametrize("value", [-1, "-5000"])
async def test_a_negative_timeout_is_invalid_argument(value):
    async with mesh([variant()], {}, {"n1": NodeCore()}) as m:
        status, details = await m.infer(params={"timeout_us": value})
        assert status == "INVALID_ARGUMENT" and "timeout_us" in details


# --- joint inference ---------------------------------------------------------------------------

def edge_unsure(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rows = len(inputs["x"])
    return {"p": np.full((rows, 2), 0.5, np.float32), "z": np.full((rows, 1), 1.0, np.float32)}


def cloud_sure(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rows = len(inputs["x"])
    return {"p": np.tile(np.array([0.1, 0.9], np.float32), (rows, 1)), "z": np.full((rows, 1), 2.0, np.float32)}


JOINT_MODEL = variant(outputs=(("p", "FP32", (-1, 2)), ("z", "FP32", (-1, 1))))
JOINT = {"m": DeploymentSpec(model="m", joint=JointSpec(mode="sync", threshold=0.8, output="p"))}


@pytest.fixture
async def joint_mesh():
    async with mesh([JOINT_MODEL], JOINT, {"e1": NodeCore(edge_unsure), "c1": NodeCore(cloud_sure)},
                    tiers={"e1": "edge", "c1": "cloud"}) as m:
        yield m


async def test_joint_inference_of_no_rows_answers_no_rows(joint_mesh):
    status, response = await joint_mesh.infer(x=np.zeros((0, 2), np.float32))
    assert status == "OK", response
    assert response.outputs["p"].shape == (0, 2) and response.parameters["cnei_escalated"] == 0


async def test_joint_inference_reads_its_output_even_when_the_client_asks_for_another(joint_mesh):
    status, response = await joint_mesh.infer(outputs=("z",))
    assert status == "OK", response
    assert list(response.outputs) == ["z"] and response.parameters["cnei_escalated"] == 1
    assert response.outputs["z"].tolist() == [[2.0]]  # the escalated row: the cloud's answer


async def test_joint_inference_refuses_an_output_the_model_does_not_have(joint_mesh):
    status, details = await joint_mesh.infer(outputs=("nope",))
    assert status == "INVALID_ARGUMENT" and "tensor 'nope'" in details


@pytest.mark.parametrize(("tier", "node", "escalated"), [("edge", "e1", 0), ("cloud", "c1", 1)])
async def test_joint_inference_stays_on_the_tier_a_request_names(joint_mesh, tier, node, escalated):
    status, response = await joint_mesh.infer(params={"tier": tier})
    assert status == "OK", response
    assert response.parameters["cnei_node"] == node
    assert response.parameters.get("cnei_escalated") == escalated


async def test_a_cloud_failing_with_internal_leaves_the_edge_answer_of_sync_joint_inference():
    async with mesh([JOINT_MODEL], JOINT, {"e1": NodeCore(edge_unsure), "c1": NodeCore(crashing)},
                    tiers={"e1": "edge", "c1": "cloud"}) as m:
        status, response = await m.infer()
        assert status == "OK", response
        assert response.parameters["cnei_node"] == "e1" and response.parameters["cnei_escalated"] == 0
        assert "CUDA error" in response.parameters["cnei_escalation_error"]


async def test_sync_joint_sends_the_whole_request_to_the_cloud_once_the_edge_model_failing_there_is_avoided():
    async with mesh([JOINT_MODEL], JOINT, {"e1": NodeCore(edge_unsure, failing=("m",)), "c1": NodeCore(cloud_sure)},
                    tiers={"e1": "edge", "c1": "cloud"}, breaker_failures=1) as m:
        assert (await m.infer())[0] == "INTERNAL"  # no other edge node to fail over to
        status, response = await m.infer()
        assert status == "OK", response
        assert response.parameters["cnei_node"] == "c1" and response.parameters["cnei_escalated"] == 1


@pytest.mark.parametrize("route", ["tier-cloud", "no-edge-node"])
async def test_joint_inference_that_sends_the_whole_request_to_the_cloud_says_so(joint_mesh, route):
    if route == "no-edge-node":
        await joint_mesh.leave_and_join("c1")
    status, response = await joint_mesh.infer(x=np.ones((2, 2), np.float32),
                                              params={"tier": "cloud"} if route == "tier-cloud" else {})
    assert status == "OK", response
    p = response.parameters
    assert (p["cnei_joint"], p["cnei_escalated"], p["cnei_cloud_node"], p["cnei_node"]) == ("sync", 2, "c1", "c1")


async def test_joint_inference_whose_output_is_not_numbers_is_failed_precondition():
    spec = {"m": DeploymentSpec(model="m", joint=JointSpec(mode="sync", output="label"))}
    texts = lambda inputs: {"label": np.array([[b"cat"]] * len(inputs["x"]), dtype=object)}  # noqa: E731
    async with mesh([variant(outputs=(("label", "BYTES", (-1, 1)),))], spec, {"e1": NodeCore(texts)}) as m:
        status, details = await m.infer()
        assert status == "FAILED_PRECONDITION"
        assert "needs output 'label' to hold numbers" in details


def cloud_renamed(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rows = len(inputs["x"])
    return {"q": np.tile(np.array([0.1, 0.9], np.float32), (rows, 1)), "z": np.full((rows, 1), 2.0, np.float32)}


def cloud_wider(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rows = len(inputs["x"])
    return {"p": np.full((rows, 5), 0.2, np.float32), "z": np.full((rows, 1), 2.0, np.float32)}


def slow_joint_mesh(edge_s: float, cloud_s: float):
    return mesh([JOINT_MODEL], JOINT, {"e1": NodeCore(edge_unsure, edge_s), "c1": NodeCore(cloud_sure, cloud_s)},
                tiers={"e1": "edge", "c1": "cloud"})


def assert_the_edge_answer_kept(status: str, response, why: str) -> None:
    assert status == "OK", response
    assert response.outputs["p"].tolist() == [[0.5, 0.5]]  # the edge's answer
    p = response.parameters
    assert (p["cnei_joint"], p["cnei_escalated"], p["cnei_node"]) == ("sync", 0, "e1")
    assert why in p["cnei_escalation_error"] and "cnei_cloud_node" not in p


async def test_sync_joint_keeps_the_edge_answer_when_no_cloud_node_is_live(joint_mesh):
    await joint_mesh.leave_and_join("e1")
    status, response = await joint_mesh.infer()
    assert_the_edge_answer_kept(status, response, "no live node can serve model 'm'")


@pytest.mark.parametrize(("params", "timeout"), [({"timeout_us": 300_000}, 10.0), ({"timeout": 300_000}, 10.0),
                                                 ({}, 0.3)], ids=["timeout-us", "tritonclient-timeout", "grpc-deadline"])
async def test_sync_joint_gives_the_cloud_only_what_the_edge_left_of_the_deadline_and_keeps_the_edge_answer(
        params, timeout):
    async with slow_joint_mesh(edge_s=0.1, cloud_s=0.4) as m:  # together past the 0.3 s the request has
        start = time.monotonic()
        status, response = await m.infer(params=params, timeout=timeout)
        assert time.monotonic() - start < 0.38  # 0.3 s and the transport's share, not 0.1 + 0.4 s
        assert_the_edge_answer_kept(status, response, "deadline")


async def test_sync_joint_with_less_time_left_than_the_clouds_round_trip_keeps_the_edge_answer_unasked():
    spec = {"m": replace(JOINT["m"], joint=replace(JOINT["m"].joint, latency_threshold_ms=1000.0))}
    cloud = NodeCore(cloud_sure)
    async with mesh([JOINT_MODEL], spec, {"e1": NodeCore(edge_unsure), "c1": cloud},
                    tiers={"e1": "edge", "c1": "cloud"}) as m:
        m.view.observe_rtt("c1", 500.0)  # near enough to escalate to, too far for 0.3 s
        status, response = await m.infer(params={"timeout_us": 300_000})
        assert_the_edge_answer_kept(status, response, "too little for the cloud")
        assert cloud.calls == []
        status, response = await m.infer(params={"timeout_us": 900_000})
        assert status == "OK" and response.parameters["cnei_escalated"] == 1, response


async def test_sync_joint_whose_own_deadline_passes_at_the_edge_is_deadline_exceeded_on_time():
    async with slow_joint_mesh(edge_s=0.3, cloud_s=0.0) as m:
        start = time.monotonic()
        status, _ = await m.infer(params={"timeout_us": 100_000})
        assert status == "DEADLINE_EXCEEDED" and time.monotonic() - start < 0.25


async def cloud_model_mismatch(cloud, message: str, route: str) -> None:
    spec = {"m": DeploymentSpec(model="m", joint=JointSpec(mode="sync", threshold=0.8, output="p", cloud_model="big"))}
    big = variant("big", outputs=(("q", "FP32", (-1, 2)), ("p", "FP32", (-1, 5)), ("z", "FP32", (-1, 1))))
    async with mesh([JOINT_MODEL, big], spec, {"e1": NodeCore(edge_unsure), "c1": NodeCore(cloud)},
                    tiers={"e1": "edge", "c1": "cloud"}) as m:
        if route == "whole-request":
            await m.leave_and_join("c1")
        status, details = await m.infer()
        assert status == "FAILED_PRECONDITION", details
        assert "joint inference of model 'm'" in details and message in details


@pytest.mark.parametrize(("cloud", "message"),
                         [(cloud_renamed, "cloud model 'big' has no output ['p']"),
                          (cloud_wider, "output 'p' of cloud model 'big' is float32 of shape [1, 5]")],
                         ids=["other-output-names", "other-output-shape"])
async def test_a_cloud_model_whose_outputs_do_not_match_the_edges_is_failed_precondition(cloud, message):
    await cloud_model_mismatch(cloud, message, "escalated-rows")


async def test_a_whole_request_answered_by_a_cloud_model_without_the_edges_outputs_is_failed_precondition():
    await cloud_model_mismatch(cloud_renamed, "cloud model 'big' has no output ['p']", "whole-request")


# --- nodes that leave --------------------------------------------------------------------------

async def test_what_the_coordinator_keeps_for_a_node_goes_when_it_leaves():
    async with mesh([variant()], {}, {"n0": NodeCore()}) as m:
        address = m.nodes["n0"].address
        for generation in range(5):  # a pod restarting: the same address under a new id each time
            m.nodes[f"pod-{generation}"] = NodeInfo(f"pod-{generation}", "edge", "r1", address, cpus=4,
                                                    models=["m:1:FP32"])
            await m.leave_and_join(f"pod-{generation}")
            status, response = await m.infer()
            assert status == "OK" and response.parameters["cnei_node"] == f"pod-{generation}"
        await asyncio.sleep(0.05)  # the batchers of the nodes that left close
        assert [key[1] for key in m.core.batchers] == ["pod-4"]
        assert set(m.core.breakers.by_node) <= {"pod-4"}
        assert m.core.outstanding == {}
        assert {key[1] for key in m.core.latency.windows} == {"pod-4"}
        assert address in m.view.channels  # the live node's channel is kept


async def test_a_node_that_leaves_loses_its_channel_and_fast_lane_connection():
    async with mesh([variant()], {}, {"n1": NodeCore(), "n2": NodeCore()}) as m:
        gone = m.nodes["n1"]
        m.nodes["n1"] = gone = NodeInfo(gone.node_id, gone.tier, gone.region, gone.address, cpus=4,
                                        fast_address="127.0.0.1:9", models=gone.models)
        await m.leave_and_join("n1", "n2")  # n1 now offers a fast lane
        m.view.channels.get(gone.address)
        m.view.fast_client(gone)
        await m.leave_and_join("n2")
        assert gone.address not in m.view.channels and gone.fast_address not in m.view._fast
        status, response = await m.infer()
        assert status == "OK" and response.parameters["cnei_node"] == "n2"


async def test_requests_queued_for_a_node_that_leaves_fail_over():
    slow = NodeCore(delay_s=1.0)
    async with mesh([variant()], {}, {"n1": slow, "n2": NodeCore()}, live=("n1",)) as m:
        busy = asyncio.create_task(m.infer(x=np.full((1, 2), 1, np.float32)))
        await asyncio.sleep(0.1)
        queued = asyncio.create_task(m.infer(x=np.full((1, 2), 2, np.float32)))
        await asyncio.sleep(0.1)
        start = time.monotonic()
        await m.leave_and_join("n2")
        status, response = await queued
        assert status == "OK" and response.parameters["cnei_node"] == "n2"
        assert time.monotonic() - start < 0.8  # not after the slow node's answer
        assert slow.markers == [1.0]
        assert (await busy)[0] == "OK"  # the batch in flight ends as the node answers it


async def test_a_batcher_closed_for_a_node_that_left_tells_later_callers_why():
    async with mesh([variant()], {}, {"n1": NodeCore()}) as m:
        assert (await m.infer())[0] == "OK"
        batcher = next(iter(m.core.batchers.values()))
        await m.leave_and_join()
        await asyncio.sleep(0.05)
        with pytest.raises(Unavailable, match="node n1 left the mesh") as caught:
            await batcher.submit({"x": X})
        assert caught.value.code is ErrorCode.UNAVAILABLE
        assert batcher._task.done()


async def test_a_node_id_back_at_other_addresses_is_called_there_not_at_the_old_ones():
    old, new = NodeCore(), NodeCore()
    async with mesh([variant()], {}, {"n1": old, "n2": new}, live=("n1",)) as m:
        assert (await m.infer())[0] == "OK" and len(old.calls) == 1
        m.nodes["n1"] = replace(m.nodes["n1"], address=m.nodes["n2"].address)  # n1's pod restarts elsewhere
        await m.leave_and_join("n1")
        await asyncio.sleep(0.05)
        status, response = await m.infer()
        assert status == "OK" and response.parameters["cnei_node"] == "n1"
        assert (len(old.calls), len(new.calls)) == (1, 1)


async def test_sync_joint_with_a_kept_edge_answer_is_no_cache_hit_when_the_cloud_answers_rows_again():
    """The edge's answer comes from the response cache, its unsure rows from the cloud: the reply
    is not a kept one (says so apart), and the statistics count the rows the cloud ran; once the
    cloud's answer is kept too, the whole reply is a cache hit."""
    specs = {"m": replace(JOINT["m"], response_cache=True)}
    cloud = NodeCore(cloud_sure)
    async with mesh([JOINT_MODEL], specs, {"e1": NodeCore(edge_unsure), "c1": cloud},
                    tiers={"e1": "edge", "c1": "cloud"}) as m:
        x = np.ones((3, 2), np.float32)
        edge_only = await m.infer(x=x, params={"tier": "edge"})  # keeps the edge's answer alone
        assert edge_only[0] == "OK" and edge_only[1].parameters["cnei_escalated"] == 0
        status, mixed = await m.infer(x=x)
        assert status == "OK", mixed
        assert mixed.parameters["cnei_escalated"] == 3 and len(cloud.calls) == 1
        assert np.allclose(mixed.outputs["p"], [[0.1, 0.9]] * 3)  # the cloud's rows
        assert "cnei_response_cache" not in mixed.parameters
        assert mixed.parameters["cnei_edge_response_cache"] is True
        status, kept = await m.infer(x=x)
        assert status == "OK" and len(cloud.calls) == 1  # both parts kept now
        assert kept.parameters["cnei_response_cache"] is True and "cnei_edge_response_cache" not in kept.parameters
        assert np.allclose(kept.outputs["p"], [[0.1, 0.9]] * 3)
        stats = m.core.statistics("m", "1")[0]
        assert stats.success.count == 3
        assert stats.inference_count == 3 + 3  # the edge's rows, then the cloud's; none for the kept answer


async def test_a_disagreement_event_the_stream_refuses_with_its_inputs_is_stored_without_them(small_nats):
    """The events stream an operator limited to 1,000-byte messages refuses the event with its
    inputs (JetStream, not NATS's max_payload): it is stored without them, saying why."""
    import nats as nats_client
    from nats.js.api import DeliverPolicy

    from services.common import events
    from services.common.bus import EventBus

    spec = {"m": DeploymentSpec(model="m", joint=JointSpec(mode="async", threshold=0.8, output="p"))}
    wide = replace(JOINT_MODEL, inputs=[TensorSpec("x", "FP32", (-1, 100))])  # a row's inputs: ~1.2 KB as JSON
    bus = EventBus(small_nats, "coordinator-test", timeout=1.0)
    await bus.start()
    try:
        async with mesh([wide], spec, {"e1": NodeCore(edge_unsure), "c1": NodeCore(cloud_sure)},
                        tiers={"e1": "edge", "c1": "cloud"}) as m:
            m.core.publish = bus.publish
            x = np.random.default_rng(1).random((1, 100), dtype=np.float32)  # over 1,000 bytes, under 4,096
            status, response = await m.infer(x=x)
            assert status == "OK", response
            listener = await nats_client.connect(small_nats)
            try:
                sub = await listener.jetstream().subscribe(events.INFERENCE_DISAGREEMENT, ordered_consumer=True,
                                                           deliver_policy=DeliverPolicy.ALL)
                payload = events.decode((await sub.next_msg(timeout=15)).data).payload
            finally:
                await listener.close()
            assert payload["rows"] == [0] and payload["inputs"] == {}
            assert "message size exceeds maximum" in payload["inputs_dropped"]
    finally:
        await bus.close()


async def test_a_disagreement_event_too_large_for_nats_is_sent_without_its_inputs(nats_server):
    """Async joint inference reports the rows edge and cloud disagree on, with their inputs, on
    NATS: an event too big for NATS with them (its 1 MiB max_payload) still goes, without them."""
    import nats as nats_client

    from services.common import events
    from services.common.bus import EventBus

    spec = {"m": DeploymentSpec(model="m", batching=BatchingSpec(max_batch_size=65536),
                                joint=JointSpec(mode="async", threshold=0.8, output="p"))}
    model = replace(JOINT_MODEL, metadata={**JOINT_MODEL.metadata, "max_batch_size": "65536"})
    bus = EventBus(nats_server, "coordinator-test")
    await bus.connect()
    listener = await nats_client.connect(nats_server)
    got: asyncio.Queue = asyncio.Queue()
    sub = await listener.subscribe(events.INFERENCE_DISAGREEMENT, cb=got.put)
    try:
        async with mesh([model], spec, {"e1": NodeCore(edge_unsure), "c1": NodeCore(cloud_sure)},
                        tiers={"e1": "edge", "c1": "cloud"}) as m:
            m.core.publish = bus.publish
            small = np.ones((3, 2), np.float32)
            big = np.random.default_rng(0).random((40_000, 2), dtype=np.float32)  # ~1.5 MB of JSON inputs
            for x in (small, big):
                status, response = await m.infer(x=x)
                assert status == "OK", response
                message = await asyncio.wait_for(got.get(), 15)
                payload = events.decode(message.data).payload
                assert payload["rows"] == list(range(len(x)))  # every row: the edge is unsure, the cloud sure
                if x is small:
                    assert payload["inputs"] == {"x": small.tolist()} and "inputs_dropped" not in payload
                else:
                    assert payload["inputs"] == {} and "over the" in payload["inputs_dropped"]
    finally:
        await sub.unsubscribe()
        await listener.close()
        await bus.close()
