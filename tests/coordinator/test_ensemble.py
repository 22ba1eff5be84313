"""Ensembles: the interface a spec implies, what is refused, and how steps run (each an ordinary
coordinator request, here answered by an in-process function)."""
from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace

import grpc
import numpy as np
import pytest

from services.common import deployment, oip
from services.common.deployment import DeploymentSpec, EnsembleStep, RolloutSpec
from services.common.ensemble_plan import ensemble_interface
from services.common.errors import (CneiError, DeadlineExceeded, ErrorCode, FailedPrecondition, InvalidArgument,
                                    Unavailable)
from services.common.model_spec import ModelVariant, TensorSpec
from services.coordinator import ensemble
from services.coordinator.repository import UNLOADED_KEY, ModelControl
from services.pb.inference import grpc_service_pb2 as pb
from tests.coordinator.mesh import NodeCore, VersionedCatalog, VersionedNode, mesh, variant

SPEC = DeploymentSpec(model="pipe", ensemble=(
    EnsembleStep(model="features", inputs=("x=image",), outputs=("f=feat", "aux=side"), tier="edge"),
    EnsembleStep(model="head", inputs=("a=feat", "b=image"), outputs=("y=label",), tier="cloud", precision="INT8"),
))


def test_the_interface_is_the_tensors_no_step_produces_and_those_no_step_consumes():
    assert ensemble_interface(SPEC) == (["image"], ["side", "label"])
    assert deployment.from_dict(deployment.dataclasses.asdict(SPEC)) == SPEC


@pytest.mark.parametrize("steps, message", [
    ((EnsembleStep(model="pipe", inputs=("x=i",), outputs=("y=o",)),), "names another model than the ensemble"),
    ((EnsembleStep(model="m", inputs=("x=i",), outputs=("y=o",), tier="fog"),), "tier must be edge, cloud"),
    ((EnsembleStep(model="m", outputs=("y=o",)),), "at least one input and one output"),
    ((EnsembleStep(model="m", inputs=("x",), outputs=("y=o",)),), "'x' must read <model tensor>=<ensemble tensor>"),
    ((EnsembleStep(model="m", inputs=("x=i",), outputs=("y=i",)),), "tensor 'i' is produced twice"),
    ((EnsembleStep(model="m", inputs=("x=later",), outputs=("y=o",)),
      EnsembleStep(model="n", inputs=("x=o",), outputs=("y=later",))), "tensor 'later' is produced twice"),
])
def test_bad_ensembles_are_invalid_with_what_is_wrong(steps, message):
    with pytest.raises(InvalidArgument, match=message):
        deployment.validate(DeploymentSpec(model="pipe", ensemble=steps))


class Steps:
    """Answers each step's request: f = x + 1, aux = x * 0, y = a + b; notes what it was sent."""

    def __init__(self, delay_s: float = 0.0):
        self.sent: list[oip.InferRequest] = []
        self.delay_s = delay_s

    async def __call__(self, request: oip.InferRequest, deadline_s: float | None) -> oip.InferResponse:
        self.sent.append(request)
        await asyncio.sleep(self.delay_s)
        i = request.inputs
        outputs = {"f": i["x"] + 1, "aux": i["x"] * 0} if request.model_name == "features" else {"y": i["a"] + i["b"]}
        return oip.InferResponse(model_name=request.model_name, model_version="1", outputs=outputs,
                                 parameters={"cnei_node": f"{request.model_name}-node", "cnei_precision": "FP32"})


async def test_steps_run_in_order_with_their_tier_precision_and_the_callers_placement_parameters():
    steps = Steps()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    request = oip.InferRequest("pipe", {"image": x}, id="r1", parameters={"region": "site-a", "precision": "FP16"})
    response = await ensemble.run(SPEC, request, 5.0, steps)
    np.testing.assert_array_equal(response.outputs["label"], (x + 1) + x)
    np.testing.assert_array_equal(response.outputs["side"], x * 0)
    assert (response.model_name, response.model_version, response.id) == ("pipe", "1", "r1")
    assert response.parameters["cnei_ensemble"] == "features@features-node/FP32 -> head@head-node/FP32"
    assert response.parameters["cnei_ensemble_versions"] == "features:1 -> head:1"
    first, second = steps.sent
    assert first.parameters == {ensemble.DEPTH: 1, "region": "site-a", "tier": "edge"}  # not the caller's precision
    assert second.parameters == {ensemble.DEPTH: 1, "region": "site-a", "tier": "cloud", "precision": "INT8"}
    assert first.outputs == ["f", "aux"] and set(second.inputs) == {"a", "b"}
    only = await ensemble.run(SPEC, oip.InferRequest("pipe", {"image": x}, outputs=["label"]), None, Steps())
    assert list(only.outputs) == ["label"]


async def test_what_an_ensemble_cannot_do_is_refused_clearly():
    x = {"image": np.zeros((1, 3), np.float32)}
    with pytest.raises(InvalidArgument, match=r"takes inputs \['image'\]; missing \['image'\]; unknown \['x'\]"):
        await ensemble.run(SPEC, oip.InferRequest("pipe", {"x": x["image"]}), None, Steps())
    with pytest.raises(InvalidArgument, match=r"has outputs \['side', 'label'\], not \['feat'\]"):
        await ensemble.run(SPEC, oip.InferRequest("pipe", x, outputs=["feat"]), None, Steps())
    with pytest.raises(FailedPrecondition, match="nests ensembles deeper than 4"):
        await ensemble.run(SPEC, oip.InferRequest("pipe", x, parameters={ensemble.DEPTH: 4}), None, Steps())
    with pytest.raises(DeadlineExceeded, match="before ensemble 'pipe' step 1"):
        await ensemble.run(SPEC, oip.InferRequest("pipe", x), 0.05, Steps(delay_s=0.1))
    renamed = DeploymentSpec(model="pipe", ensemble=(EnsembleStep(model="features", inputs=("x=image",),
                                                                  outputs=("nope=out",)),))
    with pytest.raises(FailedPrecondition, match="step 0 \\(features\\): the model has no output 'nope'"):
        await ensemble.run(renamed, oip.InferRequest("pipe", x), None, Steps())


async def test_an_ensembles_metadata_comes_from_its_steps_models():
    def variant(name: str, inputs, outputs) -> ModelVariant:
        return ModelVariant(name, "3", "FP32", "", 0, [TensorSpec(n, "FP32", s) for n, s in inputs],
                            [TensorSpec(n, "FP32", s) for n, s in outputs])
    models = {"features": variant("features", [("x", (-1, 3))], [("f", (-1, 8)), ("aux", (-1, 3))]),
              "head": variant("head", [("a", (-1, 8)), ("b", (-1, 3))], [("y", (-1, 10))])}

    async def step_variant(name: str, version: str) -> ModelVariant:
        return models[name]
    v = await ensemble.variant(SPEC, step_variant)
    assert (v.name, v.version, v.format, v.metadata["platform"]) == ("pipe", "1", "ensemble", "ensemble")
    assert v.metadata["step_versions"] == "features:3 -> head:3"
    assert [(t.name, t.shape) for t in v.inputs] == [("image", (-1, 3))]
    assert [(t.name, t.shape) for t in v.outputs] == [("side", (-1, 3)), ("label", (-1, 10))]
    assert v.max_batch_size > 0


class Timed(Steps):
    """Steps that also note the deadline each was given."""

    def __init__(self, delay_s: float = 0.0):
        super().__init__(delay_s)
        self.deadlines: list[float | None] = []

    async def __call__(self, request: oip.InferRequest, deadline_s: float | None) -> oip.InferResponse:
        self.deadlines.append(deadline_s)
        return await super().__call__(request, deadline_s)


@pytest.mark.parametrize("name", ["timeout_us", "timeout"])
async def test_a_timeout_parameter_bounds_the_whole_ensemble_not_each_step(name):
    steps = Timed(delay_s=0.16)  # the first step alone outlasts the ensemble's 150 ms
    request = oip.InferRequest("pipe", {"image": np.zeros((1, 3), np.float32)}, parameters={name: 150_000})
    with pytest.raises(DeadlineExceeded, match="before ensemble 'pipe' step 1"):
        await ensemble.run(SPEC, request, None, steps)
    assert len(steps.sent) == 1
    assert name not in steps.sent[0].parameters  # the step is given what is left instead
    assert 0.1 < steps.deadlines[0] <= 0.15


async def test_each_step_is_given_what_is_left_of_the_earliest_of_the_grpc_deadline_and_timeout_us():
    steps = Timed(delay_s=0.05)
    request = oip.InferRequest("pipe", {"image": np.zeros((1, 3), np.float32)}, parameters={"timeout_us": 2_000_000})
    await ensemble.run(SPEC, request, 5.0, steps)
    first, second = steps.deadlines
    assert 1.9 < first <= 2.0 and first - 0.1 < second <= first - 0.05


@pytest.mark.parametrize(("depth", "message"), [("x", "must be a whole number, got 'x'"),
                                                ("1.5", "must be a whole number, got '1.5'"),
                                                (-1, "must not be negative, got -1")])
async def test_a_nesting_depth_that_is_not_a_count_is_invalid_argument(depth, message):
    request = oip.InferRequest("pipe", {"image": np.zeros((1, 3), np.float32)}, parameters={ensemble.DEPTH: depth})
    with pytest.raises(InvalidArgument, match=f"parameter '{ensemble.DEPTH}' {message}"):
        await ensemble.run(SPEC, request, None, Steps())


# --- through a coordinator (tests/coordinator/mesh.py) -----------------------------------------

def through(model: str, reads: str, writes: str) -> EnsembleStep:
    return EnsembleStep(model=model, inputs=(reads,), outputs=(writes,))


INNER = DeploymentSpec(model="inner", ensemble=(through("m", "x=image", "y=mid"), through("m", "x=mid", "y=out")))
OUTER = DeploymentSpec(model="outer", ensemble=(through("inner", "image=picture", "out=answer"),), response_cache=True)


async def test_a_nested_ensemble_is_served_and_cached_with_its_metadata_from_the_inner_steps():
    async with mesh([variant()], {"inner": INNER, "outer": OUTER}, {"n1": NodeCore()},
                    response_cache_bytes=1 << 20) as m:
        x = np.arange(2, dtype=np.float32).reshape(1, 2)
        message = oip.request_to_proto(oip.InferRequest("outer", {"picture": x}))
        for _ in range(2):
            answer = oip.response_from_proto(await m.stub.ModelInfer(message, timeout=10.0))
            np.testing.assert_array_equal(answer.outputs["answer"], x)
        assert answer.parameters.get("cnei_response_cache") is True
        v = await m.core.model_variant("outer")
        assert [(t.name, t.shape) for t in v.inputs] == [("picture", (-1, 2))]


async def test_an_ensemble_cycle_that_slipped_in_is_failed_precondition_not_endless_recursion():
    a = DeploymentSpec(model="a", ensemble=(through("b", "image=x", "out=y"),))
    b = DeploymentSpec(model="b", ensemble=(through("a", "x=image", "y=out"),))
    async with mesh([variant()], {"a": a, "b": b}, {"n1": NodeCore()}) as m:
        with pytest.raises(FailedPrecondition, match="nests ensembles deeper than 4"):
            await m.core.model_variant("a")
        status, details = await m.infer("a")
        assert status == "FAILED_PRECONDITION" and "nests ensembles deeper than 4" in details


@pytest.mark.parametrize(("step", "message"),
                         [(through("m", "nope=x", "y=out"), "model 'm' has no input 'nope' (inputs: ['x'])"),
                          (through("m", "x=x", "nope=out"), "model 'm' has no output 'nope' (outputs: ['y'])")],
                         ids=["input", "output"])
async def test_a_step_mapping_a_tensor_its_model_lacks_is_failed_precondition_naming_the_ensemble_and_step(
        step, message):
    async with mesh([variant()], {"pipe": DeploymentSpec(model="pipe", ensemble=(step,))}, {"n1": NodeCore()}) as m:
        status, details = await m.infer("pipe")
        assert status == "FAILED_PRECONDITION", details
        assert f"ensemble 'pipe' step 0 (m): {message}" in details


@pytest.mark.parametrize(("version", "status"), [("", "OK"), ("1", "OK"), ("7", "NOT_FOUND")])
async def test_an_ensemble_has_version_1_only(version, status):
    async with mesh([variant()], {"inner": INNER}, {"n1": NodeCore()}) as m:
        message = oip.request_to_proto(oip.InferRequest("inner", {"image": np.ones((1, 2), np.float32)},
                                                        model_version=version))
        try:
            answer = oip.response_from_proto(await m.stub.ModelInfer(message, timeout=10.0))
            got = ("OK", answer.model_version)
        except grpc.aio.AioRpcError as exc:
            got = (exc.code().name, exc.details())
        assert got[0] == status
        assert got[1] == "1" if status == "OK" else "model 'inner' version 7 not found" in got[1]


def int8_pipe(model: str = "m") -> DeploymentSpec:
    return DeploymentSpec(model="pipe", ensemble=(EnsembleStep(model=model, inputs=("x=x",), outputs=("y=y",),
                                                               precision="INT8"),))


async def test_a_step_asking_for_int8_runs_the_newest_version_with_it_not_its_models_newer_fp32_one():
    """Its model's deployment needs no INT8: its version 2, FP32 alone, serves the model's own
    requests, and the step runs version 1 until version 2 has INT8 too."""
    variants = [variant(), replace(variant(), precision="INT8"), replace(variant(), version="2")]
    specs = {"m": DeploymentSpec(model="m"), "pipe": int8_pipe()}
    node = VersionedNode()
    async with mesh(variants, specs, {"n1": node}) as m:
        m.core.catalog = VersionedCatalog(variants, specs)
        x = np.ones((1, 2), np.float32)
        status, answer = await m.infer("pipe", x)
        assert status == "OK", answer
        np.testing.assert_array_equal(answer.outputs["y"], x * 1)  # version 1's
        assert answer.parameters["cnei_ensemble"] == "m@n1/INT8"
        assert answer.parameters["cnei_ensemble_versions"] == "m:1"
        np.testing.assert_array_equal((await m.infer("m", x))[1].outputs["y"], x * 2)  # the model's own: 2
        variants.append(replace(variant(), version="2", precision="INT8"))
        status, answer = await m.infer("pipe", x)
        np.testing.assert_array_equal(answer.outputs["y"], x * 2)
        assert answer.parameters["cnei_ensemble"] == "m@n1/INT8"


async def test_a_step_naming_no_version_sends_its_models_canary_its_share_and_the_rest_to_its_version():
    """Its model's stable version is unpinned: the step's is the newest with INT8 (2, not the
    model's latest, 3), and the canary (1) takes its share of the step's requests as of any."""
    variants = [replace(variant(), version=v, precision=p) for v in "12" for p in ("FP32", "INT8")]
    variants.append(replace(variant(), version="3"))
    specs = {"m": DeploymentSpec(model="m", rollout=RolloutSpec(canary="1", canary_percent=50.0)),
             "pipe": int8_pipe()}
    async with mesh(variants, specs, {"n1": VersionedNode()}) as m:
        m.core.catalog = VersionedCatalog(variants, specs)
        x = np.ones((1, 2), np.float32)
        answers = [await m.infer("pipe", x) for _ in range(40)]
        assert {status for status, _ in answers} == {"OK"}, answers[0]
        assert {float(answer.outputs["y"][0, 0]) for _, answer in answers} == {1.0, 2.0}
        assert [t.name for t in (await m.core.model_variant("pipe")).inputs] == ["x"]


async def test_a_step_naming_no_version_runs_the_newest_one_with_the_tensors_it_maps_not_a_newer_renaming_one():
    """Version 2 of the step's model renames its input 'x' 'z': the step runs version 1, and the
    ensemble's metadata is version 1's."""
    renamed = replace(variant(), version="2", inputs=[TensorSpec("z", "FP32", (-1, 2))])
    variants = [variant(), renamed]
    specs = {"pipe": DeploymentSpec(model="pipe", ensemble=(through("m", "x=x", "y=y"),))}
    async with mesh(variants, specs, {"n1": VersionedNode()}) as m:
        m.core.catalog = VersionedCatalog(variants, specs)
        x = np.ones((1, 2), np.float32)
        answers = [await m.infer("pipe", x) for _ in range(3)]
        assert [status for status, _ in answers] == ["OK"] * 3, answers[0]
        assert {answer.parameters["cnei_ensemble_versions"] for _, answer in answers} == {"m:1"}
        np.testing.assert_array_equal(answers[0][1].outputs["y"], x * 1)
        shown = await m.core.model_variant("pipe")
        assert [t.name for t in shown.inputs] == ["x"] and shown.metadata["step_versions"] == "m:1"


class CountingCatalog:
    """A catalog's answers, counting the lookups of each kind for each model."""

    def __init__(self, catalog: VersionedCatalog):
        self.catalog = catalog
        self.lookups: Counter[tuple[str, str]] = Counter()

    async def variants(self, model: str, version: str = "") -> list[ModelVariant]:
        self.lookups["variants", model] += 1
        return await self.catalog.variants(model, version)

    async def all_variants(self, model: str) -> list[ModelVariant]:
        self.lookups["all_variants", model] += 1
        return await self.catalog.all_variants(model)

    async def deployment(self, model: str) -> DeploymentSpec:
        self.lookups["deployment", model] += 1
        return await self.catalog.deployment(model)


@pytest.mark.parametrize("cached", [False, True], ids=["uncached", "cached"])
@pytest.mark.parametrize("nested", [False, True], ids=["steps", "nested"])
async def test_an_ensemble_request_reads_each_steps_model_once(cached, nested):
    """Its batch-size check, its cache scope, its run and each step's own request share what
    they read of a step's model (through an ensemble nested in it too)."""
    pipe = replace(int8_pipe("inner" if nested else "m"), response_cache=cached)
    specs = {"m": DeploymentSpec(model="m"), "pipe": pipe, "inner": replace(int8_pipe(), model="inner")}
    variants = [variant(), replace(variant(), precision="INT8")]
    async with mesh(variants, specs, {"n1": VersionedNode()}, response_cache_bytes=1 << 20) as m:
        m.core.catalog = catalog = CountingCatalog(VersionedCatalog(variants, specs))
        status, answer = await m.infer("pipe")
        assert status == "OK", answer
        assert answer.parameters["cnei_ensemble"] == ("inner@?/?" if nested else "m@n1/INT8")
        assert {k: n for k, n in catalog.lookups.items() if k[1] == "m"} == {
            ("deployment", "m"): 1, ("all_variants", "m"): 1, ("variants", "m"): 1}
        assert catalog.lookups["deployment", "inner"] == (1 if nested else 0)


async def test_an_ensemble_is_not_ready_while_a_model_one_of_its_steps_runs_is_unloaded(own_redis):
    """Triton: an ensemble whose composing model is not ready is not ready (nested ones too)."""
    async with mesh([variant()], {"inner": INNER, "outer": OUTER}, {"n1": NodeCore()}) as m:
        m.core.control = ModelControl(m.core, own_redis, None, ttl_s=0.0)

        async def ready(name: str) -> bool:
            return (await m.stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=10.0)).ready
        assert [await ready(n) for n in ("m", "inner", "outer")] == [True, True, True]
        await own_redis.sadd(UNLOADED_KEY, "m")
        assert [await ready(n) for n in ("m", "inner", "outer")] == [False, False, False]


@pytest.mark.parametrize(("model", "x", "message"), [
    ("inner", np.ones((1, 3), np.float32), "ensemble 'inner': tensor 'image': shape [1, 3] but model expects [-1, 2]"),
    ("inner", np.ones((1, 2), np.int32), "ensemble 'inner': tensor 'image': datatype INT32 but model expects FP32"),
    ("outer", np.ones((1, 3), np.float32), "ensemble 'outer': tensor 'picture': shape [1, 3]"),
], ids=["shape", "datatype", "nested"])
async def test_a_bad_ensemble_input_is_refused_under_the_ensembles_tensor_name_before_any_step_runs(model, x, message):
    node = NodeCore()
    async with mesh([variant()], {"inner": INNER, "outer": OUTER}, {"n1": node}) as m:
        message_sent = oip.request_to_proto(oip.InferRequest(model, {"picture" if model == "outer" else "image": x}))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await m.stub.ModelInfer(message_sent, timeout=10.0)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(message), caught.value.details()
        assert node.calls == []


class FailingStep(Steps):
    """Steps whose model `head` fails UNAVAILABLE."""

    async def __call__(self, request: oip.InferRequest, deadline_s: float | None) -> oip.InferResponse:
        if request.model_name == "head":
            raise Unavailable("no live node can serve model 'head'")
        return await super().__call__(request, deadline_s)


async def test_a_failing_step_keeps_its_code_and_names_the_ensemble_and_the_step():
    with pytest.raises(CneiError) as caught:
        await ensemble.run(SPEC, oip.InferRequest("pipe", {"image": np.zeros((1, 3), np.float32)}), None, FailingStep())
    assert caught.value.code == ErrorCode.UNAVAILABLE
    assert caught.value.message == "ensemble 'pipe' step 1 (head): no live node can serve model 'head'"


async def test_a_failing_step_of_a_nested_ensemble_names_each_ensemble_and_step_over_grpc():
    async with mesh([variant()], {"inner": INNER, "outer": OUTER}, {"n1": NodeCore(failing=("m",))}) as m:
        message = oip.request_to_proto(oip.InferRequest("outer", {"picture": np.ones((1, 2), np.float32)}))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await m.stub.ModelInfer(message, timeout=10.0)
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert caught.value.details().startswith("ensemble 'outer' step 0 (inner): ensemble 'inner' step 0 (m): ")


@pytest.mark.parametrize(("params", "message"), [
    ({"joint": "bogus"}, "parameter 'joint' must be one of ['off', 'sync', 'async'], got 'bogus'"),
    ({"tier": "bogus"}, "parameter 'tier' must be one of ['edge', 'cloud'], got 'bogus'"),
    ({"precision": "fp64"}, "parameter 'precision' must be one of ['FP32', 'FP16', 'INT8'], got 'fp64'"),
    ({"latency_budget_ms": "soon"}, "latency_budget_ms"),
    ({"tier": "cloud"}, "ensemble 'inner' takes no parameter 'tier' (got 'cloud'): its steps choose their own"),
    ({"precision": "INT8"}, "ensemble 'inner' takes no parameter 'precision' (got 'INT8')"),
    ({"joint": "sync"}, "ensemble 'inner' takes no parameter 'joint' (got 'sync')"),
    ({"accuracy_floor": 0.9}, "ensemble 'inner' takes no parameter 'accuracy_floor'"),
])
async def test_tier_precision_and_joint_on_an_ensemble_are_refused_naming_the_parameter(params, message):
    node = NodeCore()
    async with mesh([variant()], {"inner": INNER}, {"n1": node}) as m:
        async def infer(parameters: dict) -> tuple[str, str]:
            sent = oip.InferRequest("inner", {"image": np.ones((1, 2), np.float32)}, parameters=parameters)
            try:
                await m.stub.ModelInfer(oip.request_to_proto(sent), timeout=10.0)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name, exc.details()
            return "OK", ""
        status, details = await infer(params)
        assert status == "INVALID_ARGUMENT" and message in details, details
        assert node.calls == []
        assert await infer({"region": "r1", "tier": ""}) == ("OK", "")  # empty: unset
