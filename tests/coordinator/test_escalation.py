"""Joint inference's cloud side over real gRPC (tests/coordinator/mesh.py): a cloud model taken
out of service, a cloud skipped for its distance, the rows counted as escalated, and what the
reply of a request the cloud answered whole says of the model that answered it."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.common.deployment import DeploymentSpec, JointSpec
from services.coordinator.repository import UNLOADED_KEY, ModelControl
from tests.coordinator.mesh import NodeCore, mesh, variant
from tests.coordinator.test_serving_path import JOINT_MODEL, assert_the_edge_answer_kept, cloud_sure, edge_unsure

BIG = replace(variant("big", outputs=(("p", "FP32", (-1, 2)), ("z", "FP32", (-1, 1)))), version="7")
WITH_BIG = {"m": DeploymentSpec(model="m", joint=JointSpec(mode="sync", threshold=0.8, output="p", cloud_model="big"))}


def big_mesh(cloud: NodeCore, **joint):
    specs = {"m": DeploymentSpec(model="m", joint=JointSpec(**{**vars(WITH_BIG["m"].joint), **joint}))}
    return mesh([JOINT_MODEL, BIG], specs, {"e1": NodeCore(edge_unsure), "c1": cloud},
                tiers={"e1": "edge", "c1": "cloud"})


async def test_sync_joint_keeps_the_edge_answer_when_its_cloud_model_is_unloaded(own_redis):
    cloud = NodeCore(cloud_sure)
    async with big_mesh(cloud) as m:
        m.core.control = ModelControl(m.core, own_redis, None, ttl_s=0.0)
        await own_redis.sadd(UNLOADED_KEY, "big")
        status, response = await m.infer()
        assert_the_edge_answer_kept(status, response, "model 'big' is unloaded")
        assert cloud.calls == []


@pytest.mark.parametrize("route", ["tier-cloud", "no-edge-node"])
async def test_a_whole_request_for_an_unloaded_cloud_model_is_unavailable_naming_it(own_redis, route):
    cloud = NodeCore(cloud_sure)
    async with big_mesh(cloud) as m:
        m.core.control = ModelControl(m.core, own_redis, None, ttl_s=0.0)
        await own_redis.sadd(UNLOADED_KEY, "big")
        if route == "no-edge-node":
            await m.leave_and_join("c1")
        status, details = await m.infer(params={"tier": "cloud"} if route == "tier-cloud" else {})
        assert status == "UNAVAILABLE" and "model 'big' is unloaded" in details, details
        assert cloud.calls == []
        await own_redis.srem(UNLOADED_KEY, "big")  # loaded again: served again
        status, response = await m.infer(params={"tier": "cloud"} if route == "tier-cloud" else {})
        assert status == "OK" and cloud.models == ["big"], response


async def test_sync_joint_says_it_skipped_a_cloud_further_than_its_latency_threshold():
    cloud = NodeCore(cloud_sure)
    async with big_mesh(cloud, latency_threshold_ms=100.0) as m:
        m.view.observe_rtt("c1", 250.0)
        status, response = await m.infer()
        assert status == "OK" and response.outputs["p"].tolist() == [[0.5, 0.5]], response  # the edge's
        p = response.parameters
        assert p["cnei_escalated"] == 0 and "cnei_escalation_error" not in p and cloud.calls == []
        assert p["cnei_escalation_skipped"] == "the cloud's round trip, 250.0 ms, is over latency_threshold_ms 100.0"


@pytest.mark.parametrize("params", [{"critical": True}, {"tier": "edge"}], ids=["critical", "tier-edge"])
async def test_sync_joint_kept_at_the_edge_as_the_request_asks_says_nothing_skipped(params):
    async with big_mesh(NodeCore(cloud_sure), latency_threshold_ms=100.0) as m:
        m.view.observe_rtt("c1", 250.0)
        status, response = await m.infer(params=params)
        assert status == "OK" and "cnei_escalation_skipped" not in response.parameters, response


def escalated(reason: str, mode: str = "sync") -> float:
    return REGISTRY.get_sample_value("cnei_escalations_total",
                                     {"model": "m", "mode": mode, "reason": reason}) or 0.0


@pytest.mark.parametrize(("route", "reason"), [("unsure-rows", "low_confidence"), ("tier-cloud", "tier_cloud"),
                                               ("no-edge-node", "no_edge_node")])
async def test_every_row_a_reply_says_the_cloud_answered_is_counted_as_escalated_with_why(route, reason):
    async with big_mesh(NodeCore(cloud_sure)) as m:
        if route == "no-edge-node":
            await m.leave_and_join("c1")
        before = escalated(reason)
        status, response = await m.infer(x=np.ones((3, 2), np.float32),
                                         params={"tier": "cloud"} if route == "tier-cloud" else {})
        assert status == "OK" and response.parameters["cnei_escalated"] == 3, response
        assert escalated(reason) - before == 3
        recent = m.core.recent[-1]
        assert (recent["kind"], recent["rows"], recent["to"], recent["reason"]) == ("escalation", 3, "c1", reason)


@pytest.mark.parametrize("route", ["tier-cloud", "no-edge-node"])
async def test_a_request_the_cloud_model_answers_whole_is_answered_as_the_model_asked_for_naming_the_cloud_model(
        route):
    async with big_mesh(NodeCore(cloud_sure)) as m:
        if route == "no-edge-node":
            await m.leave_and_join("c1")
        status, response = await m.infer(params={"tier": "cloud"} if route == "tier-cloud" else {})
        assert status == "OK", response
        p = response.parameters
        assert (response.model_name, response.model_version) == ("m", "1")  # as Triton and KServe echo it
        assert (p["cnei_cloud_model"], p["cnei_version"], p["cnei_precision"]) == ("big", "7", "FP32")


async def test_escalated_rows_name_the_cloud_model_that_answered_them(joint_mesh_big):
    status, response = await joint_mesh_big.infer()
    assert status == "OK" and response.model_name == "m", response
    assert (response.parameters["cnei_escalated"], response.parameters["cnei_cloud_model"]) == (1, "big")


@pytest.fixture
async def joint_mesh_big():
    async with big_mesh(NodeCore(cloud_sure)) as m:
        yield m
