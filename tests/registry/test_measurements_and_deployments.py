"""The registry as a real process: runtime measurements in variant metadata, deployment specs and
their events, and both surviving a restart."""
from __future__ import annotations

import dataclasses
import json

import grpc
import nats
import numpy as np
import onnx
import pytest

from services.common import deployment, events
from services.common.deployment import BatchingSpec, DeploymentSpec, SchedulerSpec
from services.common.errors import CneiError, ErrorCode
from services.common.registry_client import NO_DEPLOYMENT
from services.models.onnx_mlp import mlp_graph
from services.pb.cnei import registry_pb2 as rpb
from tests.registry.restart import across_a_restart

ACCURACY = {"accuracy": "0.9700"}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny valid ONNX model: these tests need an artifact, not a trained one."""
    path = tmp_path_factory.mktemp("artifact") / "tiny.onnx"
    weights = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    onnx.save(mlp_graph([weights], [np.zeros(3, np.float32)], name="tiny"), path)
    return path


@pytest.fixture
async def fp32(client, name, artifact):
    """Version 1 of a fresh model in FP32 (with its accuracy) and INT8."""
    await client.push_file(artifact, name, "1", "INT8")
    return await client.push_file(artifact, name, "1", "FP32", metadata=ACCURACY)


def _measured(variant) -> dict[str, str]:
    return {k: v for k, v in variant.metadata.items() if k.startswith(("latency_ms.", "memory_bytes."))}


def _spec(model: str, **changes) -> DeploymentSpec:
    base = DeploymentSpec(model=model, batching=BatchingSpec(max_batch_size=16, max_queue_delay_us=2000,
                                                             preferred_batch_sizes=(4, 8)),
                          scheduler=SchedulerSpec(policy="least_loaded"), tiers=("edge",))
    return dataclasses.replace(base, **changes)


async def test_a_recorded_measurement_appears_in_the_variants_metadata_under_its_node_class(client, stub, fp32):
    recorded = await client.record_measurement(fp32, "edge-arm", "edge-1", 1.25, 5_000_000)
    expected = {**ACCURACY, "latency_ms.edge-arm": "1.2500", "memory_bytes.edge-arm": "5000000"}
    assert recorded.metadata == expected
    assert (await client.resolve(fp32.name, "1", "FP32")).metadata == expected
    listed = {v.precision: v for v in await client.list(fp32.name)}
    assert listed["FP32"].metadata == expected
    got = await stub.GetModel(rpb.ModelRef(name=fp32.name, version="1", precision="FP32"), timeout=5)
    assert dict(got.metadata) == expected


async def test_each_node_class_keeps_its_latest_measurement_and_other_variants_get_none(client, fp32):
    await client.record_measurement(fp32, "edge-arm", "edge-1", 1.25, 5_000_000)
    await client.record_measurement(fp32, "cloud-gpu", "cloud-1", 0.3, 9_000_000)
    await client.record_measurement(fp32, "edge-arm", "edge-2", 0.875, 4_000_000)
    listed = {v.precision: v for v in await client.list(fp32.name)}
    assert _measured(listed["FP32"]) == {
        "latency_ms.edge-arm": "0.8750", "memory_bytes.edge-arm": "4000000",
        "latency_ms.cloud-gpu": "0.3000", "memory_bytes.cloud-gpu": "9000000",
    }
    assert _measured(listed["INT8"]) == {}


@pytest.mark.parametrize("precision", ["", "fp32"], ids=["no-precision-means-fp32", "lower-case"])
async def test_a_measurement_names_its_variant_as_get_model_does(client, stub, fp32, precision):
    ref = rpb.ModelRef(name=fp32.name, version="1", precision=precision)
    reply = await stub.RecordMeasurement(
        rpb.Measurement(model=ref, node_class="edge-arm", node_id="edge-1", latency_ms=2.0, memory_bytes=1),
        timeout=5)
    assert reply.precision == "FP32"
    assert dict(reply.metadata)["latency_ms.edge-arm"] == "2.0000"
    assert _measured(await client.resolve(fp32.name, "1", "FP32"))["latency_ms.edge-arm"] == "2.0000"


@pytest.mark.parametrize(
    ("model", "version", "precision", "message"),
    [("{name}", "1", "FP16", "model '{name}' version 1 precision FP16 not found"),
     ("{name}", "2", "FP32", "model '{name}' version 2 precision FP32 not found"),
     ("{name}-other", "1", "FP32", "model '{name}-other' version 1 precision FP32 not found")],
    ids=["unknown-precision", "unknown-version", "unknown-model"],
)
async def test_a_measurement_of_an_unknown_variant_is_not_found(stub, fp32, model, version, precision, message):
    ref = rpb.ModelRef(name=model.format(name=fp32.name), version=version, precision=precision)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RecordMeasurement(rpb.Measurement(model=ref, node_class="edge-arm", node_id="e",
                                                     latency_ms=1, memory_bytes=1), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == message.format(name=fp32.name)


@pytest.mark.parametrize(
    ("node_class", "latency_ms", "memory_bytes", "message"),
    [("", 1.0, 1, "node class '' must match"), ("edge arm", 1.0, 1, "node class 'edge arm' must match"),
     ("edge-arm", -1.0, 1, "must not be negative"), ("edge-arm", 1.0, -1, "must not be negative"),
     ("edge-arm", float("nan"), 1, "must not be negative")],
    ids=["no-class", "space-in-class", "negative-latency", "negative-memory", "nan-latency"],
)
async def test_a_malformed_measurement_is_invalid_argument(client, fp32, node_class, latency_ms, memory_bytes,
                                                           message):
    with pytest.raises(CneiError, match=message) as info:
        await client.record_measurement(fp32, node_class, "edge-1", latency_ms, memory_bytes)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    assert _measured(await client.resolve(fp32.name, "1", "FP32")) == {}


async def test_a_deployment_put_comes_back_from_get_and_list(client, fp32):
    spec = _spec(fp32.name)
    assert await client.put_deployment(spec) == spec
    assert await client.get_deployment(fp32.name) == spec
    assert spec in await client.list_deployments()


async def test_putting_a_deployment_again_replaces_it(client, fp32):
    await client.put_deployment(_spec(fp32.name))
    changed = _spec(fp32.name, cloud_fallback=False, scheduler=SchedulerSpec(policy="round_robin"))
    await client.put_deployment(changed)
    assert await client.get_deployment(fp32.name) == changed
    assert [s for s in await client.list_deployments() if s.model == fp32.name] == [changed]


async def test_put_deployment_answers_with_the_stored_spec_and_when_it_was_stored(stub, fp32):
    text = json.dumps({"model": fp32.name, "scheduler": {"alpha": 1}})
    reply = await stub.PutDeployment(rpb.Deployment(spec_json=text), timeout=5)
    got = await stub.GetDeployment(rpb.GetDeploymentRequest(model=fp32.name), timeout=5)
    assert (reply.model, reply.spec_json, reply.updated_at) == (got.model, got.spec_json, got.updated_at)
    assert deployment.from_json(got.spec_json).scheduler.alpha == 1.0
    assert reply.updated_at > 0


async def test_a_put_made_over_the_deployment_read_is_stored_later_than_it(client, fp32):
    await client.put_deployment(_spec(fp32.name))
    _, read_at = await client.read_deployment(fp32.name)
    changed = _spec(fp32.name, cloud_fallback=False)
    assert await client.put_deployment(changed, if_updated_at=read_at) == changed
    assert (await client.read_deployment(fp32.name))[1] > read_at


@pytest.mark.parametrize("stored_first", [True, False], ids=["another-put-between", "one-put-where-none-was-read"])
async def test_a_put_made_over_a_deployment_that_changed_since_it_was_read_is_refused_and_not_stored(
        client, fp32, stored_first):
    if stored_first:
        await client.put_deployment(_spec(fp32.name))
        _, read_at = await client.read_deployment(fp32.name)
    else:
        read_at = NO_DEPLOYMENT
    between = _spec(fp32.name, tiers=("edge", "cloud"))
    await client.put_deployment(between)  # `cnei deploy apply` between the read and the put
    with pytest.raises(CneiError, match=f"the deployment of model '{fp32.name}' changed since it was read") as info:
        await client.put_deployment(_spec(fp32.name, cloud_fallback=False), if_updated_at=read_at)
    assert info.value.code is ErrorCode.FAILED_PRECONDITION
    assert await client.get_deployment(fp32.name) == between


async def test_a_deployment_for_an_unknown_model_is_not_found(client, name):
    with pytest.raises(CneiError, match=f"model '{name}' not found") as info:
        await client.put_deployment(DeploymentSpec(model=name))
    assert info.value.code is ErrorCode.NOT_FOUND
    assert all(s.model != name for s in await client.list_deployments())


async def test_getting_the_deployment_of_a_model_without_one_is_not_found(client, fp32):
    with pytest.raises(CneiError, match=f"no deployment for model '{fp32.name}'") as info:
        await client.get_deployment(fp32.name)
    assert info.value.code is ErrorCode.NOT_FOUND


@pytest.mark.parametrize(
    ("spec", "message"),
    [("{{not json", "deployment spec is not JSON"),
     ('{{"model": "{name}", "batching": {{"max_batch_size": 0}}}}', "max_batch_size must be positive"),
     ('{{"model": "{name}", "sheduler": {{}}}}', "has unknown fields ['sheduler']"),
     ('{{"model": "{name}", "scheduler": {{"policy": "fastest"}}}}', "scheduler policy 'fastest' must be one of"),
     ('{{"model": "{name}", "scheduler": {{"threshold": "high"}}}}', "scheduler.threshold' must be float"),
     ('{{"batching": {{}}}}', "missing 1 required positional argument: 'model'"),
     ('{{"model": "{name}", "attempt_timeout_ms": NaN}}', "'{name}.attempt_timeout_ms' must be a finite number"),
     ('{{"model": "{name}", "hedge_after_ms": Infinity}}', "'{name}.hedge_after_ms' must be a finite number"),
     ('{{"model": "{name}", "scheduler": {{"alpha": NaN}}}}', "'{name}.scheduler.alpha' must be a finite number"),
     ('{{"model": "{name}", "rollout": {{"canary_percent": -Infinity}}}}',
      "'{name}.rollout.canary_percent' must be a finite number"),
     ("[" * 100_000 + "]" * 100_000, "deployment spec is nested too deeply"),
     ('{{"model": "{name}", "precision": {{"accuracy_floor": 2}}}}',
      "'{name}.precision.accuracy_floor' must be from 0 to 1, got 2"),
     ('{{"model": "{name}", "precision": {{"latency_budget_ms": -5}}}}',
      "'{name}.precision.latency_budget_ms' must be at least 0, got -5"),
     ('{{"model": "{name}", "tiers": []}}', "'{name}.tiers' must name a tier the model can be served on, got []"),
     ('{{"model": "{name}", "scheduler": {{"threshold": 7}}}}', "'{name}.scheduler.threshold' must be from 0 to 1"),
     ('{{"model": "{name}", "joint": {{"mode": "sync", "latency_threshold_ms": -3}}}}',
      "'{name}.joint.latency_threshold_ms' must be at least 0, got -3")],
    ids=["not-json", "zero-batch", "unknown-field", "unknown-policy", "threshold-not-a-number", "no-model",
         "nan-timeout", "infinite-hedge", "nan-weight", "infinite-percent", "nested-too-deeply",
         "floor-above-one", "negative-budget", "no-tiers", "threshold-above-one", "negative-latency-threshold"],
)
async def test_an_invalid_deployment_spec_is_invalid_argument_and_not_stored(client, stub, fp32, spec, message):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.PutDeployment(rpb.Deployment(spec_json=spec.format(name=fp32.name)), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message.format(name=fp32.name) in info.value.details()
    assert all(s.model != fp32.name for s in await client.list_deployments())


async def test_putting_a_deployment_publishes_a_deployment_updated_event(nats_server, client, fp32):
    nc = await nats.connect(nats_server, connect_timeout=5)
    try:
        sub = await nc.subscribe(events.DEPLOYMENT_UPDATED)
        await nc.flush(timeout=5)
        await client.put_deployment(_spec(fp32.name))
        envelope = events.decode((await sub.next_msg(timeout=5)).data)
    finally:
        await nc.close()
    assert (envelope.type, envelope.source, envelope.payload) == (
        events.DEPLOYMENT_UPDATED, "registry", {"model": fp32.name})


async def test_measurements_and_deployments_survive_a_registry_restart(launch_registry, tmp_path, artifact):
    async def write(client):
        variant = await client.push_file(artifact, "durable", "1", "FP16")
        measured = await client.record_measurement(variant, "edge-arm", "edge-1", 1.5, 123)
        return measured, await client.put_deployment(_spec("durable"))

    async def check(client, written):
        measured, spec = written
        assert (await client.resolve("durable")).metadata == measured.metadata
        assert _measured(measured) == {"latency_ms.edge-arm": "1.5000", "memory_bytes.edge-arm": "123"}
        assert await client.get_deployment("durable") == spec
        assert await client.list_deployments() == [spec]

    await across_a_restart(launch_registry, tmp_path / "data", write, check)

async def test_a_stored_deployment_that_no_longer_reads_is_skipped_in_lists_and_named_when_asked_for(
        launch_registry, tmp_path, artifact):
    """A spec stored before a check it fails existed (a NaN timeout, accepted once) must not take
    ListDeployments down for every model: it is left out (logged), and asking for it names it."""
    import sqlite3

    data = tmp_path / "data"

    async def write(client):
        await client.push_file(artifact, "kept", "1", "FP16")
        await client.push_file(artifact, "legacy", "1", "FP16")
        kept = await client.put_deployment(_spec("kept"))
        await client.put_deployment(_spec("legacy"))
        db = sqlite3.connect(data / "catalogue.sqlite3")  # as an older registry stored it
        with db:
            db.execute("UPDATE deployments SET spec_json = ? WHERE model = 'legacy'",
                       ('{"model": "legacy", "attempt_timeout_ms": NaN}',))
        db.close()
        return kept

    async def check(client, kept):
        assert await client.list_deployments() == [kept]
        with pytest.raises(CneiError) as info:
            await client.get_deployment("legacy")
        assert info.value.code is ErrorCode.FAILED_PRECONDITION
        assert "the stored deployment of model 'legacy' no longer reads" in info.value.message
        assert "put it again" in info.value.message

    await across_a_restart(launch_registry, data, write, check)
