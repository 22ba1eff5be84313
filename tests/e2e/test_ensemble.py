"""Ensembles through the coordinator, with real processes: the digits model at the edge feeds a
calibration model pinned to the cloud (split inference); each step is placed on its tier, the
answer is the composition of the two models, and tritonclient sees the ensemble's own
metadata, config, statistics and index entry. Bad ensembles are refused when applied."""
from __future__ import annotations

import asyncio
import json
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton
import yaml
from onnx import TensorProto, helper, numpy_helper
from tritonclient.utils import InferenceServerException

from services.common import deployment
from services.common.deployment import DeploymentSpec, EnsembleStep
from services.common.errors import CneiError
from services.common.registry_client import RegistryClient
from services.models.digits import load_all
from tests.e2e.processes import put_deployment, run_perf_analyzer

PIPELINE = "digits-pipeline"
CALIBRATE = "digits-calibrate"
TEMPERATURE = 2.0


def _calibration_model(path) -> None:
    """y = softmax(T * x) over 10 classes, batch dimension dynamic."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "t"], ["scaled"]), helper.make_node("Softmax", ["scaled"], ["y"], axis=-1)],
        "calibrate",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(np.array(TEMPERATURE, np.float32), "t")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))


PIPELINE_SPEC = DeploymentSpec(model=PIPELINE, ensemble=(
    EnsembleStep(model="digits", inputs=("input=image",), outputs=("probabilities=p",), tier="edge",
                 precision="FP32"),
    EnsembleStep(model=CALIBRATE, inputs=("x=p",), outputs=("y=calibrated",), tier="cloud"),
))


@pytest.fixture(scope="module")
def pipeline(mesh, tmp_path_factory):
    path = tmp_path_factory.mktemp("calibrate") / "calibrate.onnx"
    _calibration_model(path)

    async def push() -> None:
        client = RegistryClient(mesh.registry)
        try:
            await client.push_file(path, CALIBRATE, "1", "FP32")
        finally:
            await client.close()
    asyncio.run(push())
    put_deployment(mesh, PIPELINE_SPEC)
    return PIPELINE


def _infer(client, model: str, name: str, x: np.ndarray, **kwargs):
    tensor = triton.InferInput(name, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], client_timeout=30, **kwargs)


def test_an_ensemble_runs_its_steps_on_their_tiers_and_answers_their_composition(mesh, pipeline):
    x, y = load_all()
    client = triton.InferenceServerClient(mesh.coordinator)
    try:
        reply = _infer(client, PIPELINE, "image", x[:4])
        calibrated = reply.as_numpy("calibrated")
        probabilities = _infer(client, "digits", "input", x[:4], parameters={"precision": "FP32"}).as_numpy("probabilities")
        logits = TEMPERATURE * probabilities
        expected = np.exp(logits - logits.max(axis=1, keepdims=True))
        np.testing.assert_allclose(calibrated, expected / expected.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
        assert list(calibrated.argmax(axis=1)) == list(y[:4])
        steps = reply.get_response().parameters["cnei_ensemble"].string_param.split(" -> ")
        assert steps[0].startswith("digits@edge-") and steps[0].endswith("/FP32")
        assert steps[1].startswith(f"{CALIBRATE}@cloud-1/")

        metadata = client.get_model_metadata(PIPELINE)
        assert metadata.platform == "ensemble" and list(metadata.versions) == ["1"]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("image", "FP32", [-1, 64])]
        assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("calibrated", "FP32", [-1, 10])]
        config = client.get_model_config(PIPELINE).config
        assert config.platform == "ensemble" and config.max_batch_size > 0
        assert [(s.model_name, s.model_version, dict(s.input_map), dict(s.output_map))
                for s in config.ensemble_scheduling.step] == [
            ("digits", -1, {"input": "image"}, {"probabilities": "p"}),
            (CALIBRATE, -1, {"x": "p"}, {"y": "calibrated"})]
        with urllib.request.urlopen(f"http://127.0.0.1:{mesh.settings.http_port}/v2/models/{PIPELINE}/config",
                                    timeout=10) as rest:
            rest_config = json.loads(rest.read())
        assert rest_config["platform"] == "ensemble"
        assert [s["model_name"] for s in rest_config["ensemble_scheduling"]["step"]] == ["digits", CALIBRATE]
        assert client.is_model_ready(PIPELINE)
        assert PIPELINE in {m.name for m in client.get_model_repository_index().models}
        stats = client.get_inference_statistics(PIPELINE).model_stats[0]
        assert stats.inference_stats.success.count >= 1 and stats.inference_count >= 4

        # perf_analyzer reads the ensemble's config (its steps) and finds its and the steps' statistics
        report = run_perf_analyzer(PIPELINE, mesh.coordinator, "--shape", "image:64")
        assert "Composing models:" in report and "digits, version: 1" in report

        with pytest.raises(InferenceServerException, match=r"takes inputs \['image'\]; missing \['image'\]; unknown \['input'\]") as caught:
            _infer(client, PIPELINE, "input", x[:1])
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    finally:
        client.close()


def test_an_ensemble_with_a_response_cache_answers_repeated_inputs_without_running_its_steps(mesh, pipeline):
    put_deployment(mesh, replace(PIPELINE_SPEC, model="digits-cached-pipeline", response_cache=True))
    x, _ = load_all()
    client = triton.InferenceServerClient(mesh.coordinator)
    cloud = triton.InferenceServerClient(mesh.runtime("cloud-1"))

    def calibrations() -> int:
        return sum(s.execution_count for s in cloud.get_inference_statistics(CALIBRATE).model_stats)
    try:
        first = _infer(client, "digits-cached-pipeline", "image", x[10:12])
        assert "cnei_response_cache" not in first.get_response().parameters
        before = calibrations()
        again = _infer(client, "digits-cached-pipeline", "image", x[10:12])
        assert again.get_response().parameters["cnei_response_cache"].bool_param
        assert "digits-calibrate@cloud-1" in again.get_response().parameters["cnei_ensemble"].string_param
        np.testing.assert_array_equal(again.as_numpy("calibrated"), first.as_numpy("calibrated"))
        assert calibrations() == before  # no step ran again
        stats = client.get_inference_statistics("digits-cached-pipeline").model_stats[0].inference_stats
        assert (stats.cache_hit.count, stats.cache_miss.count) == (1, 1)
    finally:
        client.close()
        cloud.close()


@pytest.mark.parametrize("spec, message", [
    (DeploymentSpec(model="digits-bad-pipe", ensemble=(
        EnsembleStep(model="no-such-model", inputs=("input=image",), outputs=("probabilities=p",)),)),
     "model 'no-such-model'"),
    (DeploymentSpec(model="digits", ensemble=(EnsembleStep(model=CALIBRATE, inputs=("x=p",), outputs=("y=c",)),)),
     "'digits' is a registered model; an ensemble needs a name of its own"),
    (DeploymentSpec(model="digits-bad-pipe", ensemble=(
        EnsembleStep(model="digits", inputs=("input",), outputs=("probabilities=p",)),)), "must read"),
    (DeploymentSpec(model="digits-bad-pipe", ensemble=(
        EnsembleStep(model="digits", inputs=("input=p",), outputs=("probabilities=p",)),)), "produced twice"),
])
def test_bad_ensembles_are_refused_when_applied(mesh, pipeline, spec, message):
    with pytest.raises(CneiError, match=message):
        put_deployment(mesh, spec)


def test_the_example_ensemble_answers_one_image_at_the_edge_in_int8_and_in_the_cloud_in_fp32(mesh):
    path = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "digits-both-tiers.yaml"
    put_deployment(mesh, deployment.from_dict(yaml.safe_load(path.read_text())))
    x, y = load_all()
    client = triton.InferenceServerClient(mesh.coordinator)
    try:
        reply = _infer(client, "digits-both-tiers", "image", x[:8])
    finally:
        client.close()
    edge, cloud = reply.as_numpy("edge_probabilities"), reply.as_numpy("cloud_probabilities")
    assert edge.shape == cloud.shape == (8, 10)
    assert sum(edge.argmax(1) == y[:8]) >= 7 and sum(cloud.argmax(1) == y[:8]) >= 7
    steps = reply.get_response().parameters["cnei_ensemble"].string_param.split(" -> ")
    assert steps[0].startswith("digits@edge-") and steps[0].endswith("/INT8")
    assert steps[1] == "digits@cloud-1/FP32"
