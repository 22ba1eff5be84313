"""Front-door routes: which requests the compiled door may serve, the placement it is handed,
and its reports booked as the full path would book them; plus the proto conversions."""
from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.common import oip
from services.common.deployment import BatchingSpec, DeploymentSpec, EnsembleStep, JointSpec, RolloutSpec, SchedulerSpec
from services.common.errors import ErrorCode, FailedPrecondition, InvalidArgument, NotFound, error_for
from services.common.model_spec import ModelVariant, TensorSpec
from services.common.nodes import NodeDirectory, NodeInfo
from services.common.trace_settings import MemoryTraceStore, TraceConfig, TraceSettings
from services.coordinator.breaker import State, Verdict
from services.coordinator.catalog import Catalog
from services.coordinator.core import Coordinator
from services.coordinator.door import DROPS_KEPT, DoorRoutes, Refusal, Route, refusal_reason
from services.coordinator.door_reports import BatchReport, RouteReport, failure_code
from services.coordinator.door_process import door_binary
from services.coordinator.door_servicer import ask_from_proto, node_rows_from_proto, reports_from_proto, route_to_proto
from services.coordinator.nodes_view import NodesView
from services.coordinator.settings import CoordinatorSettings
from services.pb.cnei import frontdoor_pb2 as fd
from services.pb.inference import grpc_service_pb2 as pb
from tests.coordinator import mesh


def variant(precision: str, accuracy: str, version: str = "1") -> ModelVariant:
    return ModelVariant("digits", version, precision, "ab" * 32, 1000, [TensorSpec("input", "FP32", [-1, 64])],
                        [TensorSpec("probabilities", "FP32", [-1, 10])],
                        metadata={"accuracy": accuracy, "max_batch_size": "16"})


class MemoryRegistry:
    def __init__(self, spec: DeploymentSpec | None = None):
        self.spec = spec or DeploymentSpec(model="digits")

    async def list(self, name: str = ""):
        if name not in ("", "digits"):
            return []
        # a second version where the deployment rolls versions out
        later = [variant("FP32", "0.97", "2")] if self.spec.rollout.canary or self.spec.rollout.stable else []
        return [variant("FP32", "0.97"), variant("INT8", "0.96"), *later]

    async def get_deployment(self, name: str):
        if name != "digits":
            raise NotFound(f"no deployment for '{name}'")
        return self.spec


class TextRegistry(MemoryRegistry):
    """digits answering with a text label (a BYTES output) besides its probabilities."""

    async def list(self, name: str = ""):
        return [replace(v, outputs=[*v.outputs, TensorSpec("label", "BYTES", [-1, 1])]) for v in await super().list(name)]


def routes(spec: DeploymentSpec | None = None, fast_address: str = "127.0.0.1:7001",
           tracing: TraceSettings | None = None, more_nodes: tuple[tuple[str, str], ...] = (), spread_nodes: int = 1,
           registry: type[MemoryRegistry] = MemoryRegistry) -> DoorRoutes:
    """Routes over edge-a1 in site-a, plus `more_nodes` ((node id, region), ...)."""
    core = Coordinator(CoordinatorSettings(), Catalog(registry(spec), 60.0), NodesView(NodeDirectory(None), 1.0))
    core.nodes.nodes = [NodeInfo(node_id, "edge", region, f"127.0.0.1:{7000 + 2 * i}",
                                 fast_address=fast_address and f"127.0.0.1:{7001 + 2 * i}", updated_at=time.time())
                        for i, (node_id, region) in enumerate((("edge-a1", "site-a"),) + more_nodes)]
    return DoorRoutes(core, ttl_ms=100, tracing=tracing, spread_nodes=spread_nodes, spread_margin=0.1)


def ask(params: dict | None = None, model: str = "digits", shape=(4, 64)) -> oip.InferRequest:
    return oip.InferRequest(model, {"input": np.zeros(shape, np.float32)}, parameters=params or {})


@pytest.mark.parametrize(
    ("params", "spec", "reason"),
    [({}, {}, ""),
     ({"precision": "INT8", "accuracy_floor": 0.9, "latency_budget_ms": 5, "region": "a", "tier": "edge"}, {}, ""),
     ({"triton_enable_empty_final_response": False}, {}, ""),
     ({"priority": 1}, {}, "parameters ['priority'] are handled by the full path"),
     ({"timeout_us": 5, "joint": "sync"}, {}, "parameters ['joint', 'timeout_us']"),
     ({}, {"joint": JointSpec(mode="sync")}, "joint inference (sync)"),
     ({}, {"hedge_after_ms": -1.0}, "hedged requests")],
    ids=["plain", "placement-parameters", "triton-client-hint", "priority", "timeout-and-joint", "joint-deployment",
         "hedging"])
def test_only_requests_whose_handling_a_route_captures_may_take_the_door(params, spec, reason):
    found = refusal_reason(ask(params), DeploymentSpec(model="digits", **spec))
    assert found.startswith(reason) if reason else found == ""


@pytest.mark.parametrize(("text", "code"), [("UNAVAILABLE: connection lost", ErrorCode.UNAVAILABLE),
                                            ("DEADLINE_EXCEEDED: no reply", ErrorCode.DEADLINE_EXCEEDED),
                                            ("garbled", ErrorCode.INTERNAL)])
def test_a_failure_text_names_its_code(text, code):
    assert failure_code(text) is code


async def test_a_route_names_the_node_variant_and_batch_limit_and_keeps_its_id_while_unchanged():
    door = routes()
    first = await door.route(ask({"precision": "INT8"}))
    assert isinstance(first, Route)
    assert (first.placement.node.node_id, first.placement.variant.precision) == ("edge-a1", "INT8")
    assert (first.batching.max_batch_size, first.batching.max_inflight_batches, first.timeout_ms) == (16, 1, 2000)
    assert first.response.parameters["cnei_precision"] == "INT8"
    assert first.response.parameters["cnei_front_door"] is True
    again = await door.route(ask({"precision": "INT8"}, shape=(1, 64)))
    assert again.route_id == first.route_id
    other = await door.route(ask({"precision": "FP32"}))
    assert other.route_id != first.route_id


class MeasuredRegistry(MemoryRegistry):
    """digits measured at `latency_ms` a row on edge nodes (both precisions)."""
    latency_ms = "150"

    async def list(self, name: str = ""):
        return [replace(v, metadata={**v.metadata, "latency_ms.edge": self.latency_ms}) for v in await super().list(name)]


class UnbatchedRegistry(MeasuredRegistry):
    async def list(self, name: str = ""):
        return [replace(v, metadata={**v.metadata, "max_batch_size": "0"}) for v in await super().list(name)]


@pytest.mark.parametrize(("registry", "shape", "timeout_ms"), [
    (MemoryRegistry, (4, 64), 2000),
    (MeasuredRegistry, (4, 64), 2 * 150 * 16),  # two calls of a full batch (16 rows)
    (UnbatchedRegistry, (10, 64), 2 * 150 * 10),  # two calls of a request of the route's shape
], ids=["unmeasured", "measured-batched", "measured-unbatched"])
async def test_a_route_s_node_call_limit_is_the_attempt_limit_of_its_largest_call(registry, shape, timeout_ms):
    route = await routes(DeploymentSpec(model="digits", attempt_timeout_ms=2000), registry=registry).route(
        ask(shape=shape))
    assert isinstance(route, Route) and route.timeout_ms == timeout_ms


async def test_a_route_names_every_node_as_good_as_the_best_as_alternatives_each_a_route_of_its_own():
    door = routes(more_nodes=(("edge-a2", "site-a"), ("edge-b1", "site-b")), spread_nodes=4)
    route = await door.route(ask({"region": "site-a"}))
    assert isinstance(route, Route)
    nodes = [route.placement.node.node_id] + [r.placement.node.node_id for r in route.alternatives]
    assert sorted(nodes) == ["edge-a1", "edge-a2"]  # edge-b1 is in another region: far behind
    assert len({route.route_id} | {r.route_id for r in route.alternatives}) == 2
    assert all(door.routes[r.route_id].placement.node.node_id == r.placement.node.node_id
               for r in route.alternatives)  # reports of an alternative are booked against its node
    door.core.nodes.compute_ms.update({"edge-a1": 0.25, "edge-a2": 1.0})
    route = await door.route(ask({"region": "site-a"}))
    reply = route_to_proto(route)
    assert [a.node_id for a in reply.alternatives] == [r.placement.node.node_id for r in route.alternatives]
    speeds = {reply.node_id: reply.row_ms} | {a.node_id: a.row_ms for a in reply.alternatives}
    assert speeds == {"edge-a1": 0.25, "edge-a2": 1.0}  # the door weighs each node's queue by it
    assert reply.alternatives[0].fast_address and reply.alternatives[0].request_template


@pytest.mark.parametrize(("policy", "enum"), [("round_robin", fd.RouteReply.POLICY_ROUND_ROBIN),
                                              ("random", fd.RouteReply.POLICY_RANDOM),
                                              ("least_loaded", fd.RouteReply.POLICY_LEAST_LOADED)])
@pytest.mark.parametrize("spread_nodes", [1, 4])
async def test_a_baseline_policy_s_route_names_every_node_the_full_path_chooses_among_for_the_door_to_pick_per_request(
        policy, enum, spread_nodes):
    """Whatever the spread settings, other regions included (the baselines ignore scores), the
    place choice first; the reply carries the policy the door picks by."""
    spec = DeploymentSpec(model="digits", scheduler=SchedulerSpec(policy=policy))
    door = routes(spec, more_nodes=(("edge-a2", "site-a"), ("edge-b1", "site-b")), spread_nodes=spread_nodes)
    route = await door.route(ask({"region": "site-a"}))
    nodes = [route.placement.node.node_id] + [r.placement.node.node_id for r in route.alternatives]
    assert sorted(nodes) == ["edge-a1", "edge-a2", "edge-b1"]
    assert len({route.route_id} | {r.route_id for r in route.alternatives}) == 3
    reply = route_to_proto(route)
    assert reply.policy == enum
    assert [reply.node_id] + [a.node_id for a in reply.alternatives] == nodes


async def test_a_baseline_policy_s_route_leaves_out_nodes_whose_breaker_blocks_them_and_other_tiers():
    spec = DeploymentSpec(model="digits", scheduler=SchedulerSpec(policy="round_robin"), tiers=("edge",))
    door = routes(spec, more_nodes=(("edge-a2", "site-a"), ("edge-b1", "site-b")))
    door.core.nodes.nodes.append(replace(door.core.nodes.nodes[0], node_id="cloud-1", tier="cloud", region="cloud"))
    door.core.breakers.get("edge-a2").trip("connection reset")
    route = await door.route(ask())
    nodes = [route.placement.node.node_id] + [r.placement.node.node_id for r in route.alternatives]
    assert sorted(nodes) == ["edge-a1", "edge-b1"]


async def test_an_edgeai_route_says_so_and_the_door_weighs_its_alternatives():
    route = await routes().route(ask())
    assert route.policy == "edgeai" and route_to_proto(route).policy == fd.RouteReply.POLICY_EDGEAI


@pytest.mark.parametrize(
    ("door", "request_", "reason"),
    [(lambda: routes(), ask(model="nope"), "model 'nope'"),
     (lambda: routes(), ask(shape=(4, 63)), "shape [4, 63]"),
     (lambda: routes(registry=TextRegistry), ask(), "has BYTES outputs (label): the coordinator splits their rows"),
     (lambda: routes(fast_address=""), ask(), "offers no fast lane"),
     (lambda: routes(DeploymentSpec(model="digits", joint=JointSpec(mode="sync"))), ask(), "joint inference"),
     (lambda: routes(DeploymentSpec(model="digits", ensemble=(EnsembleStep(model="tiny", inputs=("x=input",),
                                                                           outputs=("y=out",)),))),
      ask(), "is an ensemble"),
     (lambda: routes(tracing=TraceSettings(MemoryTraceStore(TraceConfig(rate=1)))), ask(),
      "every request for model 'digits' is traced")],
    ids=["unknown-model", "wrong-shape", "bytes-output", "no-fast-lane", "joint", "ensemble", "all-traced"])
async def test_requests_the_door_must_not_serve_are_refused_with_the_reason(door, request_, reason):
    decision = await door().route(request_)
    assert isinstance(decision, Refusal) and reason in decision.reason


async def test_a_route_serves_every_batch_size_whatever_the_rows_of_the_request_that_asked():
    """One request over max_batch_size must not take the route from the requests of its key (the
    door checks each request's rows against the route's limit, and forwards the ones it refuses)."""
    door = routes()
    decision = await door.route(ask(shape=(17, 64)))
    assert isinstance(decision, Route) and decision.batching.max_batch_size == 16


def _histogram(name: str, model: str) -> tuple[float, float]:
    """(count, sum) of a coordinator histogram for one model."""
    return (REGISTRY.get_sample_value(f"{name}_count", {"model": model}) or 0.0,
            REGISTRY.get_sample_value(f"{name}_sum", {"model": model}) or 0.0)


async def test_a_report_is_booked_like_requests_served_by_the_full_path():
    door = routes()
    route = await door.route(ask())
    batches_before, queued_before = _histogram("cnei_batch_size", "digits"), _histogram("cnei_batch_queue_seconds", "digits")
    unknown = door.apply([RouteReport(route.route_id, [2_000_000, 3_000_000], [1, 3],
                                      [BatchReport(4, 2, 1_500_000, 500_000)], queue_ns=[400_000, 100_000]),
                          RouteReport(999)])
    assert unknown == [999]
    stats = door.core.stats.get("digits", "1")
    assert (stats.inference_count, stats.success.count, stats.success.ns) == (4, 2, 5_000_000)
    # Triton's executions are the node calls, with the node's compute time; queue time per request
    assert (stats.execution_count, stats.compute_infer.ns, dict(stats.batches)[4].count) == (1, 500_000, 1)
    assert (stats.queue.count, stats.queue.ns) == (2, 500_000)
    # The door's batches and queue waits show in the same histograms as the full path's.
    batches, queued = _histogram("cnei_batch_size", "digits"), _histogram("cnei_batch_queue_seconds", "digits")
    assert (batches[0] - batches_before[0], batches[1] - batches_before[1]) == (1, 4)
    assert queued[0] - queued_before[0] == 2
    assert queued[1] - queued_before[1] == pytest.approx(0.0005)
    assert door.core.nodes.rtt_ms["edge-a1"] == pytest.approx(1.0)
    assert door.core.nodes.compute_ms["edge-a1"] == pytest.approx(0.125)


async def test_answers_from_the_doors_cache_are_booked_as_successes_without_executions():
    door = routes(DeploymentSpec(model="digits", response_cache=True))
    route = await door.route(ask())
    assert route.response_cache and route_to_proto(route).response_cache
    door.apply([RouteReport(route.route_id, [2_000_000], [1], [BatchReport(1, 1, 1_500_000, 500_000)],
                            queue_ns=[100_000], cache_hit_request_ns=[300_000, 200_000], cache_hit_rows=[1, 2],
                            cache_hit_ns=40_000, cache_misses=1, cache_miss_ns=30_000)])
    stats = door.core.stats.get("digits", "1")
    # Triton: inference_count counts the rows models ran, not the cache's answers
    assert (stats.success.count, stats.inference_count, stats.execution_count) == (3, 1, 1)
    assert (stats.cache_hit.count, stats.cache_hit.ns, stats.cache_miss.count, stats.cache_miss.ns) == \
        (2, 40_000, 1, 30_000)
    assert not (await routes().route(ask())).response_cache


async def test_what_the_door_served_by_a_route_dropped_meanwhile_and_what_it_refused_are_booked():
    door = routes()
    route = await door.route(ask())
    door.forget("digits")  # a repository load: the door hears of it after its next report
    assert door.apply([RouteReport(route.route_id, [2_000_000], [1], [BatchReport(1, 1, 1_500_000, 500_000)],
                                   failed_request_ns=[300_000, 400_000],
                                   failed_codes=["DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"])]) == [route.route_id]
    stats = door.core.stats.get("digits", "1")
    assert (stats.success.count, stats.fail.count, stats.fail.ns, stats.execution_count) == (1, 2, 700_000, 1)


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_the_doors_refusals_are_booked_as_the_full_path_books_failures_and_its_queue_drops_counted():
    """Requests the door took out of its queue unsent count in cnei_batch_dropped_total under the
    full path's reasons; a refusal after its node call does not. None is booked against a node or
    version in cnei_coordinator_requests_total (the full path books its failures with neither)."""
    door = routes()
    route = await door.route(ask())
    reasons = ("queue_full", "deadline", "cancelled")
    before = {r: _sample("cnei_batch_dropped_total", model="digits", reason=r) for r in reasons}
    nodeless = {"model": "digits", "version": "", "precision": "", "node": "", "tier": ""}
    full_before = _sample("cnei_coordinator_requests_total", **nodeless, outcome="resource_exhausted")
    door.apply([RouteReport(route.route_id, failed_request_ns=[1, 2, 3, 4, 5],
                            failed_codes=["RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "CANCELLED",
                                          "DEADLINE_EXCEEDED", "INVALID_ARGUMENT"],
                            failed_dropped=["queue_full", "deadline", "cancelled", "", ""])])
    assert {r: _sample("cnei_batch_dropped_total", model="digits", reason=r) - before[r] for r in reasons} == \
        {"queue_full": 1, "deadline": 1, "cancelled": 1}
    assert _sample("cnei_coordinator_requests_total", **nodeless, outcome="resource_exhausted") - full_before == 1
    booked = [s.labels for m in REGISTRY.collect() if m.name == "cnei_coordinator_requests" for s in m.samples
              if s.labels.get("model") == "digits" and s.labels.get("outcome") != "ok" and s.value]
    assert booked and all(labels["node"] == "" and labels["version"] == "" for labels in booked)
    assert door.core.stats.get("digits", "1").fail.count == 5


async def test_a_failed_node_call_opens_the_breaker_and_forgets_the_route():
    door = routes()
    route = await door.route(ask())
    assert door.apply([RouteReport(route.route_id, handed_over=3, failure="UNAVAILABLE: connection lost")]) == []
    assert door.core.breakers.get("edge-a1").state is State.OPEN
    assert door.apply([RouteReport(route.route_id)]) == [route.route_id]
    assert isinstance(await door.route(ask()), Refusal)  # no node left to route to


def breakers_of(core: Coordinator, node_id: str, model: str) -> tuple[tuple[State, int], tuple[State, int] | None]:
    """(state, failures) of the node's breaker and of its breaker of `model` (None: not kept)."""
    node, pair = core.breakers.get(node_id), core.breakers.by_model.get((node_id, model))
    return (node.state, node.failures), (pair.state, pair.failures) if pair else None


def two_timeouts_and_a_fault(core: Coordinator, node_id: str, model: str) -> None:
    core.breakers.record(node_id, model, Verdict.FAULTY, "crashed")
    core.breakers.get(node_id).failure("timed out")
    core.breakers.get(node_id).failure("timed out")


async def breakers_after_the_full_path_hears(code: ErrorCode):
    """A node's breakers, two timeouts and a fault of the model counted, after its real gRPC
    server answered `code`."""
    def answer(inputs):
        raise error_for(code, f"the node says {code.value}")
    async with mesh.mesh([mesh.variant()], {}, {"n1": mesh.NodeCore(answer)}, breaker_failures=3) as m:
        two_timeouts_and_a_fault(m.core, "n1", "m:1:FP32")
        assert (await m.infer())[0] != "OK"
        return breakers_of(m.core, "n1", "m:1:FP32")


@pytest.mark.parametrize("code", list(ErrorCode), ids=lambda code: code.value)
async def test_a_node_s_error_answer_does_the_same_to_its_breakers_through_the_door_and_the_full_path(code):
    door = routes()
    route = await door.route(ask())
    model = route.placement.variant.key
    two_timeouts_and_a_fault(door.core, "edge-a1", model)
    door.apply([RouteReport(route.route_id, handed_over=1, failure=f"{code.value}: the node says so")])
    assert breakers_of(door.core, "edge-a1", model) == await breakers_after_the_full_path_hears(code)


@pytest.mark.parametrize(("failure", "reason"), [
    ("INTERNAL: unparseable reply from 127.0.0.1:7001", "INTERNAL: unparseable reply from node edge-a1"),
    ("UNKNOWN: backend crashed", "UNKNOWN: backend crashed"),
    ("DATA_LOSS: truncated tensor", "DATA_LOSS: truncated tensor"),
    ("DEADLINE_EXCEEDED: no reply from 127.0.0.1:7001 within 2.000s",
     "node edge-a1 did not answer model {model} within its attempt limit of 2.000 s")],
    ids=["malformed-reply", "unknown", "data-loss", "attempt-limit"])
async def test_a_node_s_own_failure_reported_by_the_door_counts_towards_opening_its_breaker_of_the_model(
        failure, reason):
    door = routes()
    for left in (2, 1, 0):
        route = await door.route(ask())  # a failed route is dropped: the door asks again
        assert isinstance(route, Route)
        door.apply([RouteReport(route.route_id, handed_over=1, failure=failure)])
        breaker = door.core.breakers.by_model[("edge-a1", route.placement.variant.key)]
        assert breaker.state is (State.OPEN if left == 0 else State.CLOSED)
    assert breaker.reason == reason.format(model=route.placement.variant.key)
    assert door.core.breakers.get("edge-a1").state is State.CLOSED


def crashing(inputs):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def connection_lost(inputs):
    raise error_for(ErrorCode.UNAVAILABLE, "connection lost")


async def ask_the_coordinator(m: mesh.Mesh, model: str = "m") -> fd.RouteReply:
    """FrontDoorControl/Route for requests of one row of `model`, as the compiled door asks it."""
    asked = pb.ModelInferRequest(model_name=model)
    asked.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    return await m.door_stub.Route(fd.RouteRequest(infer_request=asked.SerializeToString()), timeout=5)


async def test_a_node_past_its_open_period_gets_no_route_until_the_full_path_s_probe_closes_its_breaker():
    node = mesh.NodeCore()
    async with mesh.mesh([mesh.variant()], {}, {"n1": node}, fast_lane=True, door=True, breaker_open_s=0.2) as m:
        assert (await ask_the_coordinator(m)).node_id == "n1"
        breaker = m.core.breakers.get("n1")
        breaker.trip("connection reset")
        await asyncio.sleep(0.25)  # the open period is over: the next call is the probe
        reply = await ask_the_coordinator(m)
        assert not reply.eligible and reply.reason == \
            "node n1 is on trial after failures (connection reset): the full path probes it"
        assert breaker.state is State.OPEN and not node.calls, "the door was handed no route and claimed nothing"
        status, response = await m.infer()  # a request the door forwards: the full path's probe
        assert status == "OK" and response.parameters["cnei_node"] == "n1" and len(node.calls) == 1
        assert breaker.state is State.CLOSED
        reply = await ask_the_coordinator(m)
        assert reply.eligible and reply.node_id == "n1"


async def test_a_peer_past_its_open_period_is_left_out_of_a_route_until_it_is_probed():
    async with mesh.mesh([mesh.variant()], {}, {"n1": mesh.NodeCore(), "n2": mesh.NodeCore()}, fast_lane=True,
                         door=True, breaker_open_s=0.2) as m:
        m.door.spread_nodes, m.door.spread_margin = 2, 1.0  # every node in the route
        m.core.outstanding["n2"] = 4  # n2 scores below n1: the route's peer
        assert [(await ask_the_coordinator(m)).alternatives[0].node_id] == ["n2"]
        m.core.breakers.get("n2").trip("connection reset")
        await asyncio.sleep(0.25)
        reply = await ask_the_coordinator(m)
        assert reply.eligible and reply.node_id == "n1" and not reply.alternatives


def open_breaker(m: mesh.Mesh, node_id: str, which: str) -> None:
    """Open the node's own breaker (one connection reset), or its breaker of model m (failures)."""
    if which == "node":
        m.core.breakers.get(node_id).trip("connection reset")
        return
    for _ in range(m.core.settings.breaker_failures):
        m.core.breakers.record(node_id, "m:1:FP32", Verdict.FAULTY, "model m cannot run here")


async def settled(condition, timeout_s: float = 5.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("which", ["node", "model"])
async def test_a_peer_past_its_open_period_is_probed_by_the_coordinator_and_back_in_the_routes_once_it_answers(which):
    n1, n2 = mesh.NodeCore(), mesh.NodeCore()
    async with mesh.mesh([mesh.variant()], {}, {"n1": n1, "n2": n2}, fast_lane=True, door=True,
                         breaker_open_s=0.2) as m:
        # every node in the route (the probe measures n2's RTT, n1's is unknown); identical peers:
        # the full path always picks n1
        m.door.spread_nodes, m.door.spread_margin = 4, 1.0
        assert [a.node_id for a in (await ask_the_coordinator(m)).alternatives] == ["n2"]
        open_breaker(m, "n2", which)
        assert not (await ask_the_coordinator(m)).alternatives and not n2.calls, "open: neither routed nor probed"
        await asyncio.sleep(0.25)
        reply = await ask_the_coordinator(m)
        assert reply.node_id == "n1" and not reply.alternatives, "on trial: the probe goes, no route yet"
        await settled(lambda: not m.core.breakers.on_trial("n2", "m:1:FP32"))
        assert [c["x"].shape for c in n2.calls] == [(1, 2)], "one probe of the route's shape"
        reply = await ask_the_coordinator(m)  # n2's RTT is measured now: it may rank first
        assert sorted([reply.node_id, *(a.node_id for a in reply.alternatives)]) == ["n1", "n2"]


async def test_a_peer_whose_probe_fails_is_left_out_again_and_probed_after_its_next_open_period():
    n2 = mesh.NodeCore(failing=("m",))
    async with mesh.mesh([mesh.variant()], {}, {"n1": mesh.NodeCore(), "n2": n2}, fast_lane=True, door=True,
                         breaker_open_s=0.2) as m:
        m.door.spread_nodes, m.door.spread_margin = 4, 1.0
        open_breaker(m, "n2", "model")
        pair = m.core.breakers.by_model[("n2", "m:1:FP32")]
        for probes in (1, 2):
            await asyncio.sleep(0.25)
            assert not (await ask_the_coordinator(m)).alternatives
            await settled(lambda: pair.state is State.OPEN and not pair.probing)
            assert len(n2.calls) == probes, "one probe per open period, never left claimed"
            assert not (await ask_the_coordinator(m)).alternatives


@pytest.mark.parametrize(("answer", "opened"), [(crashing, ("n1", "m:1:FP32")), (connection_lost, ("n1", ""))],
                         ids=["its-breaker-of-the-model", "its-own"])
async def test_a_node_whose_breaker_opens_loses_its_routes_at_the_door_at_once(tmp_path, answer, opened):
    node = mesh.NodeCore(answer)
    async with mesh.mesh([mesh.variant(), mesh.variant("other")], {}, {"n1": node}, fast_lane=True, door=True,
                         breaker_failures=1) as m:
        m.door.generation_file = tmp_path / "routes-generation"  # what the door watches
        route_id = (await ask_the_coordinator(m)).route_id
        told: list[tuple[str, str]] = []
        m.core.breakers.on_open = lambda *key: (told.append(key), m.door.forget_node(*key))
        assert (await m.infer())[0] != "OK"  # the full path's verdict opens a breaker of n1
        assert told == [opened]
        assert m.door.generation_file.read_text() == "1\n1\tm\n", "the door drops the routes of m now"
        reply = await m.door_stub.Report(fd.FrontDoorReport(routes=[fd.RouteReport(route_id=route_id)]), timeout=5)
        assert list(reply.unknown_routes) == [route_id]


async def test_a_node_that_leaves_the_view_loses_its_routes_at_the_door_at_once(tmp_path):
    async with mesh.mesh([mesh.variant()], {}, {"n1": mesh.NodeCore(), "n2": mesh.NodeCore()}, fast_lane=True,
                         door=True) as m:
        m.door.generation_file = tmp_path / "routes-generation"  # what the door watches
        m.core.outstanding["n2"] = 4  # n1 scores best: the route names it
        route_id = (await ask_the_coordinator(m)).route_id
        assert m.door.routes[route_id].placement.node.node_id == "n1"
        await m.leave_and_join("n2")  # n1's heartbeat expired: it is gone, not failing
        told = m.door.generation_file.read_text() if m.door.generation_file.exists() else "nothing"
        assert told == "1\n1\tm\n", "the door drops the routes of m now"
        reply = await m.door_stub.Report(fd.FrontDoorReport(routes=[fd.RouteReport(route_id=route_id)]), timeout=5)
        assert list(reply.unknown_routes) == [route_id]
        assert (await ask_the_coordinator(m)).node_id == "n2"


async def test_what_the_door_reports_of_a_node_that_left_says_nothing_of_a_node_back_under_its_id():
    async with mesh.mesh([mesh.variant()], {}, {"n1": mesh.NodeCore(), "n2": mesh.NodeCore()}, fast_lane=True,
                         door=True, breaker_failures=1) as m:
        route_id = (await ask_the_coordinator(m)).route_id
        assert m.door.routes[route_id].placement.node.node_id == "n1"
        m.nodes["n1"] = replace(m.nodes["n1"], address=m.nodes["n2"].address,
                                fast_address=m.nodes["n2"].fast_address)  # n1's pod restarts elsewhere
        await m.leave_and_join("n1")
        m.core.nodes.rtt_ms.clear()
        failed = fd.RouteReport(route_id=route_id, handed_over=1, failure="UNAVAILABLE: connection refused")
        failed.batches.add(rows=1, requests=1, duration_ns=5_000_000, compute_ns=1_000_000)
        await m.door_stub.Report(fd.FrontDoorReport(routes=[failed]), timeout=5)  # a call to the old place
        assert m.core.breakers.allows("n1", "m:1:FP32") and "n1" not in m.core.nodes.rtt_ms
        reply = await ask_the_coordinator(m)
        assert reply.eligible and reply.node_id == "n1" and reply.fast_address == m.nodes["n2"].fast_address


async def test_a_model_failing_on_a_node_loses_its_routes_there_and_the_node_s_other_models_keep_theirs():
    nodes = {"n1": mesh.NodeCore(failing=("bad",)), "n2": mesh.NodeCore()}
    async with mesh.mesh([mesh.variant("good"), mesh.variant("bad")], {}, nodes, fast_lane=True, door=True,
                         breaker_failures=2) as m:
        m.core.outstanding["n2"] = 4  # n1 scores best: every route names it first
        for model in ("good", "bad"):
            assert (await ask_the_coordinator(m, model)).node_id == "n1"
        for _ in range(2):  # the door's calls of bad to n1 fail INTERNAL, reported
            route_id = (await ask_the_coordinator(m, "bad")).route_id
            await m.door_stub.Report(fd.FrontDoorReport(routes=[fd.RouteReport(
                route_id=route_id, handed_over=1, failure="INTERNAL: onnx runtime: it broke")]), timeout=5)
        good, bad = await ask_the_coordinator(m, "good"), await ask_the_coordinator(m, "bad")
        assert good.eligible and good.node_id == "n1", "n1 still serves good through the door"
        assert bad.eligible and bad.node_id == "n2"
        assert m.core.breakers.by_model[("n1", "bad:1:FP32")].state is State.OPEN


async def test_routes_of_a_forgotten_model_are_unknown_to_the_door_s_next_report_and_others_stay(tmp_path):
    door = routes()
    door.generation_file = tmp_path / "routes-generation"  # what the door watches
    route = await door.route(ask())
    assert door.apply([RouteReport(route.route_id)]) == []  # a held route, idle: still known
    door.forget("other-model")
    assert door.apply([RouteReport(route.route_id)]) == []
    door.forget("digits")
    assert door.apply([RouteReport(route.route_id)]) == [route.route_id]
    # the number, then each model dropped with its number: the door drops its own routes of them
    assert door.generation_file.read_text() == "2\n1\tother-model\n2\tdigits\n"
    again = await door.route(ask())  # asked again: the same decision keeps its id
    assert again.route_id == route.route_id and door.apply([RouteReport(route.route_id)]) == []


async def test_the_generation_file_names_the_latest_drops_only(tmp_path):
    door = routes()
    door.generation_file = tmp_path / "routes-generation"
    for i in range(DROPS_KEPT + 5):
        door.forget(f"model-{i}")
    lines = door.generation_file.read_text().splitlines()
    assert lines[0] == str(DROPS_KEPT + 5) and len(lines) == 1 + DROPS_KEPT
    assert lines[1] == "6\tmodel-5" and lines[-1] == f"{DROPS_KEPT + 5}\tmodel-{DROPS_KEPT + 4}"


async def test_forget_at_door_returns_once_the_door_reports_the_generation_applied():
    door = routes()
    waiting = asyncio.create_task(door.forget_at_door("digits"))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # the door has not said so yet
    door.applied(door.generation - 1)  # an older number: still waiting
    await asyncio.sleep(0.01)
    assert not waiting.done()
    door.applied(door.generation)
    assert await asyncio.wait_for(waiting, 1) is True


async def test_forget_at_door_gives_up_after_its_timeout_when_no_door_answers():
    door = routes()
    door.confirm_timeout_s = 0.05
    assert await door.forget_at_door("digits") is False
    assert door._confirmations == []


async def test_a_canary_rollout_routes_each_version_with_its_share_and_named_versions_alone():
    door = routes(DeploymentSpec(model="digits", rollout=RolloutSpec(stable="1", canary="2", canary_percent=20)))
    split = await door.route(ask())
    assert (split.stats_key, split.share, split.group) == (("digits", "1"), pytest.approx(0.8), 1)
    (canary,) = split.alternatives
    assert (canary.stats_key, canary.share, canary.group, canary.response.model_version) == \
        (("digits", "2"), pytest.approx(0.2), 2, "2")
    assert split.route_id != canary.route_id
    reply = route_to_proto(split)
    assert reply.share == pytest.approx(0.8) and reply.alternatives[0].share == pytest.approx(0.2)
    assert (reply.split_group, reply.alternatives[0].split_group) == (1, 2)
    named = await door.route(oip.InferRequest("digits", {"input": np.zeros((4, 64), np.float32)}, model_version="2"))
    assert (named.stats_key, named.share, named.alternatives) == (("digits", "2"), 0.0, ())
    pinned = await routes(DeploymentSpec(model="digits", rollout=RolloutSpec(stable="1"))).route(ask())
    assert (pinned.stats_key, pinned.share) == (("digits", "1"), 0.0)  # the pin, although 2 is the latest
    whole = await routes(DeploymentSpec(model="digits", rollout=RolloutSpec(stable="1", canary="2",
                                                                           canary_percent=100))).route(ask())
    assert (whole.stats_key, whole.share, whole.alternatives) == (("digits", "2"), 0.0, ())  # no split left


async def test_under_a_canary_each_version_s_routes_name_every_peer_node_in_its_group():
    door = routes(DeploymentSpec(model="digits", rollout=RolloutSpec(stable="1", canary="2", canary_percent=20)),
                  more_nodes=(("edge-a2", "site-a"),), spread_nodes=4)
    split = await door.route(ask())
    every = (split, *split.alternatives)
    assert sorted((r.group, r.stats_key[1], r.placement.node.node_id, r.share) for r in every) == [
        (1, "1", "edge-a1", pytest.approx(0.8)), (1, "1", "edge-a2", pytest.approx(0.8)),
        (2, "2", "edge-a1", pytest.approx(0.2)), (2, "2", "edge-a2", pytest.approx(0.2))]
    assert len({r.route_id for r in every}) == 4
    assert all(r.alternatives == () for r in split.alternatives)


def test_the_route_request_becomes_zero_inputs_of_the_same_shapes():
    message = pb.ModelInferRequest(model_name="digits", model_version="2")
    message.inputs.add(name="input", datatype="FP32", shape=[3, 64])
    message.parameters["precision"].string_param = "INT8"
    message.outputs.add(name="probabilities")
    request = ask_from_proto(fd.RouteRequest(infer_request=message.SerializeToString()))
    assert (request.model_name, request.model_version, request.parameters) == ("digits", "2", {"precision": "INT8"})
    assert request.inputs["input"].shape == (3, 64) and request.outputs == ["probabilities"]


@pytest.mark.parametrize(("payload", "message"), [(b"\xff\xff", "not a ModelInferRequest"),
                                                  (None, "unknown datatype 'FP33'")],
                         ids=["garbage", "bad-datatype"])
def test_a_route_request_that_is_not_a_valid_request_is_invalid_argument(payload, message):
    if payload is None:
        bad = pb.ModelInferRequest(model_name="digits")
        bad.inputs.add(name="input", datatype="FP33", shape=[1])
        payload = bad.SerializeToString()
    with pytest.raises(InvalidArgument, match=message):
        ask_from_proto(fd.RouteRequest(infer_request=payload))


async def test_a_deployment_s_queue_delay_and_preferred_sizes_travel_with_its_route():
    spec = DeploymentSpec(model="digits", batching=BatchingSpec(max_batch_size=8, max_queue_delay_us=1500,
                                                                preferred_batch_sizes=(4, 8)))
    reply = route_to_proto(await routes(spec).route(ask({"precision": "FP32"})))
    assert reply.eligible, reply.reason
    assert (reply.max_batch_size, reply.max_queue_delay_us, list(reply.preferred_batch_sizes)) == (8, 1500, [4, 8])


async def test_a_route_travels_as_templates_the_door_fills_in():
    route = await routes().route(ask({"precision": "INT8"}))
    reply = route_to_proto(route)
    sent = pb.ModelInferRequest.FromString(reply.request_template)
    answer = pb.ModelInferResponse.FromString(reply.response_template)
    assert (reply.eligible, reply.node_id, reply.fast_address, reply.max_batch_size) == (True, "edge-a1",
                                                                                          "127.0.0.1:7001", 16)
    assert (reply.max_inflight_batches, reply.max_queue_size) == (1, 1024)
    assert (sent.model_name, sent.model_version, sent.parameters["precision"].string_param) == ("digits", "1", "INT8")
    assert answer.parameters["cnei_node"].string_param == "edge-a1"
    assert (reply.max_queue_delay_us, list(reply.preferred_batch_sizes)) == (0, [])
    refused = route_to_proto(Refusal("no"))
    assert (refused.eligible, refused.reason) == (False, "no")


async def test_a_least_loaded_route_carries_each_nodes_heartbeat_for_the_door_to_weigh_as_the_full_path():
    door = routes(DeploymentSpec(model="digits", scheduler=SchedulerSpec(policy="least_loaded")),
                  more_nodes=(("edge-a2", "site-a"),))
    loads = {"edge-a1": (3, 8, 0.5), "edge-a2": (0, 2, 0.25)}  # in flight, CPUs, CPU load
    door.core.nodes.nodes = [replace(n, inflight=loads[n.node_id][0], cpus=loads[n.node_id][1],
                                     cpu_load=loads[n.node_id][2]) for n in door.core.nodes.nodes]
    reply = route_to_proto(await door.route(ask({"precision": "FP32"})))
    assert reply.policy == fd.RouteReply.POLICY_LEAST_LOADED
    sent = {r.node_id: (r.node_inflight, r.node_cpus, r.node_cpu_load) for r in (reply, *reply.alternatives)}
    assert sent == loads


def test_reports_convert_with_every_field():
    message = fd.FrontDoorReport(routes=[fd.RouteReport(
        route_id=7, request_ns=[10, 20], request_rows=[1, 2], handed_over=1, failure="UNAVAILABLE: x",
        batches=[fd.Batch(rows=3, requests=2, duration_ns=30, compute_ns=5)], queue_ns=[4, 6],
        failed_request_ns=[8, 9], failed_code=["DEADLINE_EXCEEDED", "INVALID_ARGUMENT"], failed_dropped=["deadline", ""])])
    assert reports_from_proto(message) == [RouteReport(7, [10, 20], [1, 2], [BatchReport(3, 2, 30, 5)], 1,
                                                       "UNAVAILABLE: x", [4, 6], failed_request_ns=[8, 9],
                                                       failed_codes=["DEADLINE_EXCEEDED", "INVALID_ARGUMENT"],
                                                       failed_dropped=["deadline", ""])]


def test_the_doors_rows_per_node_from_its_report_are_shown_per_node_as_it_last_said_them():
    door = routes(DeploymentSpec(model="digits"))
    first = fd.FrontDoorReport(node_rows=[fd.NodeRows(node_id="edge-a1", rows=12),
                                          fd.NodeRows(node_id="cloud-1", rows=3, given_back=2)])
    assert node_rows_from_proto(first) == {"edge-a1": (12, 0), "cloud-1": (3, 2)}
    door.node_rows(node_rows_from_proto(first))
    door.node_rows(node_rows_from_proto(fd.FrontDoorReport(node_rows=[fd.NodeRows(node_id="edge-a1", rows=0)])))
    shown = {(node, name): REGISTRY.get_sample_value(name, {"node": node}) for node in ("edge-a1", "cloud-1")
             for name in ("cnei_front_door_node_rows", "cnei_front_door_node_rows_given_back")}
    assert shown == {("edge-a1", "cnei_front_door_node_rows"): 0.0, ("edge-a1", "cnei_front_door_node_rows_given_back"): 0.0,
                     ("cloud-1", "cnei_front_door_node_rows"): 3.0, ("cloud-1", "cnei_front_door_node_rows_given_back"): 2.0}


@pytest.mark.parametrize("policy", ["least_loaded", "edgeai"])
async def test_the_doors_rows_at_a_node_keep_placement_off_it_until_its_last_report_is_stale(policy):
    """The full path's placement (its requests, and the first node of the routes it hands the
    door) weighs the rows the door reported at each node beside its own, as long as the report
    is fresh: a door that stopped reporting leaves no load behind."""
    door = routes(DeploymentSpec(model="digits", scheduler=SchedulerSpec(policy=policy)),
                  more_nodes=(("edge-a2", "site-a"),))
    first = await door.route(ask())
    assert first.placement.node.node_id == "edge-a1"  # the tie goes to the smaller node id
    door.node_rows(node_rows_from_proto(fd.FrontDoorReport(node_rows=[fd.NodeRows(node_id="edge-a1", rows=12),
                                                                      fd.NodeRows(node_id="edge-a2", rows=0)])))
    assert (await door.route(ask())).placement.node.node_id == "edge-a2"
    assert door.core.rows_outstanding() == {"edge-a1": 12}
    door.core.door_rows_at -= door.core.door_rows_max_age_s + 0.1
    assert (await door.route(ask())).placement.node.node_id == "edge-a1"
    assert door.core.outstanding == {}  # the door's rows are weighed, never taken as the coordinator's own


@pytest.mark.parametrize(("mode", "exists", "expected"), [("off", True, None), ("auto", False, None),
                                                          ("auto", True, "door"), ("on", True, "door")])
def test_the_door_runs_when_asked_for_and_built(tmp_path, mode, exists, expected):
    binary = tmp_path / "cnei-frontdoor"
    if exists:
        binary.write_bytes(b"")
    assert door_binary(mode, str(binary)) == (binary if expected else None)


@pytest.mark.parametrize(("mode", "message"), [("on", "not found: build it with `make frontdoor`"),
                                               ("maybe", "front_door must be one of")])
def test_a_door_that_is_required_but_missing_or_a_bad_mode_is_a_clear_error(tmp_path, mode, message):
    with pytest.raises(FailedPrecondition, match=message):
        door_binary(mode, str(tmp_path / "missing"))


async def test_routes_send_one_request_in_trace_rate_to_the_traced_path_while_tracing_is_on():
    tracing = TraceSettings(MemoryTraceStore(TraceConfig(rate=5)))
    door = routes(tracing=tracing)
    assert await door.trace_every("digits") == 5
    await tracing.update("digits", {"trace_level": ["OFF"]})
    assert await door.trace_every("digits") == 0
    await tracing.update("digits", {"trace_level": ["TIMESTAMPS"], "trace_count": ["0"]})
    assert await door.trace_every("digits") == 0  # no traces left to start
    assert await routes().trace_every("digits") == 0  # spans not exported: nothing is traced
