"""Status snapshot: node health from breakers and probes, variants, deployments, latency, events,
and the page and JSON routes on a real Coordinator whose registry answers or fails."""
from __future__ import annotations

import time
from dataclasses import replace

import pytest
from aiohttp.test_utils import TestClient, TestServer

from services.common.deployment import DeploymentSpec, JointSpec, PrecisionSpec, RolloutSpec, SchedulerSpec
from services.common.errors import CneiError, ErrorCode
from services.common.model_spec import ModelVariant, TensorSpec
from services.common.nodes import NodeDirectory, NodeInfo
from services.common.stats import StatsBook
from services.coordinator.breaker import Breaker, State, Verdict
from services.coordinator.catalog import Catalog
from services.coordinator.core import Coordinator
from services.coordinator.latency import LatencyBook
from services.coordinator.nodes_view import NodesView
from services.common.restricted import parse
from services.coordinator.rest import build_app, status_routes
from services.coordinator.settings import CoordinatorSettings
from services.coordinator.stats_share import StatsShare
from services.coordinator.status import (build_status, event_rows, latency_rows, model_rows, node_health,
                                         node_row, variant_latencies)


def variant(precision: str, version: str = "1", **metadata: str) -> ModelVariant:
    return ModelVariant("digits", version, precision, "ab" * 32, 1000,
                        [TensorSpec("input", "FP32", [-1, 64])], [TensorSpec("probabilities", "FP32", [-1, 10])],
                        metadata=metadata)


def breaker(state: State) -> Breaker:
    return Breaker(clock=lambda: 0.0, state=state, opened_at=0.0)


@pytest.mark.parametrize(
    ("unhealthy", "state", "expected"),
    [(set(), None, "live"), (set(), State.CLOSED, "live"), (set(), State.OPEN, "open"),
     (set(), State.HALF_OPEN, "half-open"), ({"n1"}, State.CLOSED, "unhealthy"), ({"n1"}, State.OPEN, "unhealthy")],
    ids=["no-breaker-yet", "closed", "open", "half-open", "failed-health-check", "unhealthy-wins-over-breaker"],
)
def test_node_health_comes_from_the_health_probe_then_the_breaker(unhealthy, state, expected):
    assert node_health("n1", unhealthy, breaker(state) if state else None) == expected


def test_a_node_row_carries_load_heartbeat_age_rtt_and_cached_models():
    node = NodeInfo("edge-a1", "edge", "site-a", "127.0.0.1:1", models=["digits:1:INT8", "digits:1:FP16"],
                    inflight=2, cpu_load=0.256, mem_load=0.5, updated_at=100.0)
    row = node_row(node, 1.23456, set(), breaker(State.HALF_OPEN), 3, now=101.5)
    assert row == {
        "id": "edge-a1", "tier": "edge", "region": "site-a", "address": "127.0.0.1:1", "node_class": "edge",
        "health": "half-open", "breaker": "half-open", "inflight": 2, "outstanding": 3, "cpu_load": 0.256,
        "mem_load": 0.5, "cpus": 1, "cache_bytes": 0, "models": ["digits:1:FP16", "digits:1:INT8"],
        "heartbeat_age_s": 1.5, "rtt_ms": 1.235, "model_breakers": [],
    }


def test_a_node_row_lists_its_breakers_of_models_that_failed_there_beside_its_own():
    node = NodeInfo("edge-a1", "edge", "site-a", "127.0.0.1:1", updated_at=100.0)
    failed = replace(breaker(State.CLOSED), failures=1, reason="onnx runtime: it broke")
    row = node_row(node, None, set(), None, 0, now=101.0,
                   faults={"digits:1:INT8": breaker(State.OPEN), "digits:1:FP16": failed})
    assert (row["health"], row["breaker"]) == ("live", "closed")
    assert row["model_breakers"] == [
        {"model": "digits:1:FP16", "breaker": "closed", "failures": 1, "reason": "onnx runtime: it broke"},
        {"model": "digits:1:INT8", "breaker": "open", "failures": 0, "reason": ""}]


def test_variant_latencies_are_read_per_node_class_and_bad_numbers_are_skipped():
    v = variant("FP32", accuracy="0.97", **{"latency_ms.edge": "0.51234", "latency_ms.cloud": "0.2",
                                           "latency_ms.gpu": "fast"})
    assert variant_latencies(v) == {"cloud": 0.2, "edge": 0.512}


def test_models_list_newest_version_first_with_the_applied_deployment_or_the_defaults():
    variants = [variant("FP32", "1", accuracy="0.9"), variant("INT8", "2", accuracy="0.95"),
                variant("FP32", "2", accuracy="0.96"), variant("FP32", "10")]
    other = ModelVariant("tiny", "1", "FP32", "cd" * 32, 10, [], [])
    spec = DeploymentSpec(model="digits", scheduler=SchedulerSpec(policy="least_loaded"),
                          joint=JointSpec(mode="sync", threshold=0.8), rollout=RolloutSpec("2", "10", 5))
    rows = model_rows(variants + [other], {"digits": spec})
    digits, tiny = rows
    assert [(v["version"], v["precision"]) for v in digits["variants"]] == [
        ("10", "FP32"), ("2", "INT8"), ("2", "FP32"), ("1", "FP32")]
    assert digits["latest_version"] == "10"
    assert digits["variants"][1]["accuracy"] == 0.95
    assert digits["deployment"]["applied"] and digits["deployment"]["scheduler"] == "least_loaded"
    assert (digits["deployment"]["joint"], digits["deployment"]["joint_threshold"]) == ("sync", 0.8)
    assert not tiny["deployment"]["applied"] and tiny["deployment"]["scheduler"] == "edgeai"
    assert tiny["deployment"]["joint_threshold"] is None
    assert (digits["deployment"]["rollout"], tiny["deployment"]["rollout"]) == ("v2 + v10 canary 5 %", "latest")
    assert digits["in_service"] and tiny["in_service"]
    assert [m["in_service"] for m in model_rows(variants + [other], {}, frozenset({"tiny"}))] == [True, False]


def test_latency_rows_give_p50_and_p99_in_milliseconds_per_model_and_node():
    book = LatencyBook()
    for ms in range(1, 101):
        book.add(("digits", "edge-a1"), ms / 1e3)
    book.add(("digits", "cloud-1"), 0.004)
    rows = latency_rows(book)
    assert [(r["model"], r["node"], r["samples"]) for r in rows] == [
        ("digits", "cloud-1", 1), ("digits", "edge-a1", 100)]
    assert rows[1]["p50_ms"] == pytest.approx(50.5)
    assert rows[1]["p99_ms"] == pytest.approx(99.01)


def test_events_come_newest_first_with_their_age_and_are_capped():
    recent = [{"kind": "up", "time": 10.0, "node": "a"}, {"kind": "failover", "time": 30.0, "model": "m"},
              {"kind": "down", "time": 20.0, "node": "a"}]
    rows = event_rows(recent, now=40.0, limit=2)
    assert [(e["kind"], e["age_s"]) for e in rows] == [("failover", 10.0), ("down", 20.0)]


class FakeRegistry:
    def __init__(self, fail: bool = False, deployments: tuple[DeploymentSpec, ...] = (DeploymentSpec(model="digits"),)):
        self.fail = fail
        self.deployments = list(deployments)

    async def list(self, name: str = ""):
        if self.fail:
            raise CneiError("registry at 127.0.0.1:1 unavailable", ErrorCode.UNAVAILABLE)
        return [variant("FP32", accuracy="0.97"), variant("INT8", accuracy="0.96")]

    async def list_deployments(self):
        return self.deployments


def coordinator(registry: FakeRegistry) -> Coordinator:
    core = Coordinator(CoordinatorSettings(), Catalog(registry, 1.0), NodesView(NodeDirectory(None), 1.0))
    now = time.time()
    core.nodes.nodes = [NodeInfo("edge-a1", "edge", "site-a", "127.0.0.1:1", updated_at=now),
                        NodeInfo("cloud-1", "cloud", "cloud", "127.0.0.1:2", updated_at=now)]
    core.nodes.rtt_ms["edge-a1"] = 0.8
    core.nodes.unhealthy["cloud-1"] = "health check failed: connection refused"
    core.breakers.get("edge-a1").trip()
    core.breakers.record("cloud-1", "digits:1:FP32", Verdict.FAULTY, "onnx runtime: it broke")
    core.latency.add(("digits", "edge-a1"), 0.002)
    core.recent.append({"kind": "failover", "time": now, "model": "digits", "from": "edge-b1",
                        "to": "edge-a1", "reason": "UNAVAILABLE"})
    core.stats.get("digits", "1").record(True, 2_000_000)
    return core


async def test_the_snapshot_of_a_coordinator_shows_nodes_models_latency_events_and_no_federated_jobs():
    status = await build_status(coordinator(FakeRegistry()))
    assert [(n["id"], n["health"]) for n in status["nodes"]] == [("cloud-1", "unhealthy"), ("edge-a1", "open")]
    assert [b["model"] for b in status["nodes"][0]["model_breakers"]] == ["digits:1:FP32"]
    assert status["models"][0]["name"] == "digits"
    assert [v["precision"] for v in status["models"][0]["variants"]] == ["INT8", "FP32"]
    assert status["models_error"] is None
    assert status["latency"][0]["p50_ms"] == pytest.approx(2.0)
    assert status["events"][0]["kind"] == "failover"
    assert status["stats"][0]["success"] == 1
    assert status["federated"]["jobs"] == []


async def test_a_nodes_outstanding_rows_are_the_coordinators_own_plus_the_front_doors_fresh_ones():
    core = coordinator(FakeRegistry())
    core.outstanding["edge-a1"] = 2
    core.door_reported({"edge-a1": 5, "cloud-1": 7}, time.monotonic())
    status = await build_status(core)
    assert {n["id"]: n["outstanding"] for n in status["nodes"]} == {"edge-a1": 7, "cloud-1": 7}


async def test_the_snapshot_adds_up_the_statistics_of_every_coordinator_worker(tmp_path):
    core = coordinator(FakeRegistry())  # worker 0: one request of 2 ms
    core.stats_view = StatsShare(str(tmp_path), 0, core.stats)  # as __main__ wires a worker
    other = StatsBook()  # worker 1: two requests of 4 ms, shared through the directory
    for _ in range(2):
        other.get("digits", "1").record(True, 4_000_000)
    StatsShare(str(tmp_path), 1, other).write()
    status = await build_status(core)
    assert status["stats"] == [{"model": "digits", "version": "1", "success": 3, "fail": 0, "inferences": 3,
                                "mean_ms": pytest.approx(10 / 3, abs=1e-3)}]


async def test_a_failing_registry_becomes_an_error_field_and_nodes_are_still_shown():
    status = await build_status(coordinator(FakeRegistry(fail=True)))
    assert status["models"] == []
    assert "registry at 127.0.0.1:1 unavailable" in status["models_error"]
    assert len(status["nodes"]) == 2


@pytest.mark.parametrize("spec, header", [("statistics:stats-key=s", "stats-key"),
                                           ("metadata:meta-key=m", "meta-key")])
async def test_the_status_json_needs_the_key_of_a_restricted_statistics_or_metadata_api(spec, header):
    core = coordinator(FakeRegistry())  # it shows both: every model's statistics, the models and nodes
    async with TestClient(TestServer(build_app(core, status_routes(core), restricted=parse(spec)))) as client:
        refused = await client.get("/api/status")
        assert refused.status == 403 and f"send header '{header}'" in (await refused.json())["error"]
        assert (await client.get("/api/status", headers={header: spec[-1]})).status == 200
        assert (await client.get("/")).status == 200  # the page holds no data: what it polls is restricted


@pytest.mark.parametrize("fail", [False, True], ids=["registry-up", "registry-down"])
async def test_the_rest_app_serves_the_page_at_the_root_and_the_json_it_polls(fail):
    core = coordinator(FakeRegistry(fail=fail))
    async with TestClient(TestServer(build_app(core, status_routes(core)))) as client:
        page = await client.get("/")
        assert page.status == 200 and page.content_type == "text/html"
        html = await page.text()
        assert "/api/status" in html and "Federated jobs" in html
        assert "http://" not in html and "https://" not in html  # nothing external to load
        reply = await client.get("/api/status")
        assert reply.status == 200
        body = await reply.json()
        assert {n["id"] for n in body["nodes"]} == {"edge-a1", "cloud-1"}
        assert (body["models_error"] is not None) == fail


async def test_federated_jobs_recorded_in_redis_appear_in_the_snapshot_newest_first(redis_server):
    from redis.asyncio import Redis

    from services.cli.status import status_text
    from services.common.jobs import JobRecord, JobSpec, JobStore, RoundRecord

    redis = Redis.from_url(redis_server)
    store = JobStore(redis)
    older = JobRecord(spec=JobSpec(model="digits", rounds=3), state="completed", round=3, new_version="7",
                      history=[RoundRecord(3, ["edge-a1", "edge-b1"], [], 0.9612, 0.12, 0.5)], created_at=1.0)
    newer = JobRecord(spec=JobSpec(model="digits", rounds=5), state="running", round=1, created_at=2.0)
    try:
        for job in (older, newer):
            await store.save(job)
        status = await build_status(coordinator(FakeRegistry()), store)
        rows = [j for j in status["federated"]["jobs"] if j["id"] in (older.id, newer.id)]
        assert [j["id"] for j in rows] == [newer.id, older.id]
        assert rows[1] | {"updated_at": 0} == {
            "id": older.id, "model": "digits", "state": "completed", "round": 3, "rounds": 3,
            "strategy": "fedavg", "participants": ["edge-a1", "edge-b1"], "accuracy": 0.9612,
            "base_version": "", "new_version": "7", "error": "", "updated_at": 0}
        text = status_text(status)
        assert older.id in text and "3/3" in text and "edge-a1,edge-b1" in text and "0.9612" in text
    finally:
        await redis.delete(f"cnei:federated:job:{older.id}", f"cnei:federated:job:{newer.id}")
        await redis.zrem("cnei:federated:jobs", older.id, newer.id)
        await redis.aclose()


async def test_unreachable_job_records_become_the_federated_note():
    from redis.asyncio import Redis

    from services.common.jobs import JobStore

    redis = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    try:
        status = await build_status(coordinator(FakeRegistry()), JobStore(redis))
    finally:
        await redis.aclose()
    assert status["federated"]["jobs"] == []
    assert status["federated"]["note"].startswith("job records unavailable")


def test_an_ensemble_is_listed_with_its_steps():
    from services.common.deployment import EnsembleStep

    pipe = DeploymentSpec(model="pipe", ensemble=(
        EnsembleStep(model="digits", inputs=("input=i",), outputs=("probabilities=p",), tier="edge"),
        EnsembleStep(model="tiny", inputs=("x=p",), outputs=("y=o",))))
    renamed = replace(variant("FP32", "2"), inputs=[TensorSpec("pixels", "FP32", [-1, 64])])
    rows = model_rows([variant("FP32", "1"), renamed], {"pipe": pipe, "gone": DeploymentSpec(model="gone")})
    assert [r["name"] for r in rows] == ["digits", "pipe"]  # a plain deployment without variants is not a model
    # the version each step runs (version 2 renames the input step 0 reads); a step over a model the
    # coordinator has no variants of shows none
    assert rows[1]["deployment"]["ensemble"] == "digits:1@edge -> tiny" and rows[1]["variants"] == []
    assert rows[0]["deployment"]["ensemble"] is None


async def test_the_status_text_lists_ensembles_apart_from_deployments():
    from services.cli.status import status_text
    from services.common.deployment import EnsembleStep

    status = await build_status(coordinator(FakeRegistry()))
    pipe = DeploymentSpec(model="pipe", ensemble=(
        EnsembleStep(model="digits", inputs=("input=i",), outputs=("probabilities=p",), tier="edge"),))
    status["models"] = model_rows([variant("FP32", "1")], {"pipe": pipe})
    text = status_text(status)
    deployments, ensembles = text.split("DEPLOYMENTS")[1].split("ENSEMBLES")
    assert "pipe" not in deployments and "digits" in deployments
    assert "pipe" in ensembles and "digits:1@edge" in ensembles


def test_the_nodes_out_of_use_are_those_of_the_deployment_the_requests_region_first():
    core = Coordinator(CoordinatorSettings(), Catalog(FakeRegistry(), 1.0), NodesView(NodeDirectory(None), 1.0))
    now = time.time()
    core.nodes.nodes = [NodeInfo(n, tier, region, "127.0.0.1:1", updated_at=now) for n, tier, region in (
        ("cloud-1", "cloud", "cloud"), ("edge-a1", "edge", "site-a"), ("edge-b1", "edge", "site-b"),
        ("edge-c1", "edge", "site-c"))]
    core.breakers.get("edge-a1").trip("fast lane 127.0.0.1:1 unreachable: refused")
    core.breakers.get("edge-b1").trip("breaker reason")
    core.nodes.unhealthy["edge-b1"] = "health check failed: certificate verify failed"  # the probe's word wins
    core.nodes.unhealthy["cloud-1"] = "health check failed: refused"
    core.breakers.get("gone-1").trip("a node no longer live")
    spec = DeploymentSpec(model="digits", tiers=("edge",), cloud_fallback=False)
    assert list(core.out_of_use(spec, "site-b").items()) == [
        ("edge-b1", "health check failed: certificate verify failed"),
        ("edge-a1", "fast lane 127.0.0.1:1 unreachable: refused")]
    with_cloud = DeploymentSpec(model="digits", tiers=("edge", "cloud"), cloud_fallback=True)
    assert list(core.out_of_use(with_cloud)) == ["cloud-1", "edge-a1", "edge-b1"]
    for _ in range(3):  # digits fails on edge-c1: out of use for digits alone
        core.breakers.record("edge-c1", "digits:1:FP32", Verdict.FAULTY, "onnx runtime: it broke")
    assert list(core.out_of_use(spec, "site-b")) == ["edge-b1", "edge-a1"]
    assert list(core.out_of_use(spec, "site-b", ["digits:1:FP32"]).items())[2:] == [
        ("edge-c1", "model digits:1:FP32: onnx runtime: it broke")]


@pytest.mark.parametrize(("policy", "shown"), [
    (PrecisionSpec(), "auto"),
    (PrecisionSpec(accuracy_floor=0.95), "floor≥0.95"),
    (PrecisionSpec(latency_budget_ms=2.0), "≤2ms"),
    (PrecisionSpec(accuracy_floor=0.9, latency_budget_ms=1.5), "floor≥0.9 ≤1.5ms"),
    (PrecisionSpec(precision="INT8", accuracy_floor=0.95), "INT8"),  # a pinned precision wins
])
async def test_a_deployments_precision_policy_is_shown_on_the_status_json_and_by_cnei_status(policy, shown):
    from services.cli.status import status_text

    core = coordinator(FakeRegistry(deployments=(DeploymentSpec(model="digits", precision=policy),)))
    async with TestClient(TestServer(build_app(core, status_routes(core)))) as client:
        body = await (await client.get("/api/status")).json()
    assert body["models"][0]["deployment"]["precision"] == shown
    row = next(line for line in status_text(body).split("DEPLOYMENTS")[1].splitlines() if line.startswith("digits"))
    assert f"  {shown}  " in row
