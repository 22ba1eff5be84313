"""End to end: third-party OIP clients against the running mesh, bad input, REST, traces."""
from __future__ import annotations

import time
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from services.cli import infra
from services.models.digits import load_all
from tests.e2e.processes import assert_refused, rest_json, run_perf_analyzer, start_coordinator


def _infer_all_digits(client: triton.InferenceServerClient, batch: int = 64) -> tuple[float, dict]:
    """Every digit, `batch` rows a request (64: the max_batch_size coordinator and runtimes show)."""
    x, y = load_all()
    correct, params = 0, {}
    for start in range(0, len(x), batch):
        xb = x[start:start + batch]
        tensor = triton.InferInput("input", list(xb.shape), "FP32")
        tensor.set_data_from_numpy(xb)
        result = client.infer("digits", [tensor])
        correct += int((result.as_numpy("probabilities").argmax(axis=1) == y[start:start + batch]).sum())
        params = result.get_response().parameters
    return correct / len(y), params


def test_tritonclient_reads_metadata_and_config_from_the_coordinator(mesh):
    client = triton.InferenceServerClient(mesh.coordinator)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits")
    meta = client.get_model_metadata("digits")
    assert (meta.inputs[0].name, meta.inputs[0].datatype, list(meta.inputs[0].shape)) == ("input", "FP32", [-1, 64])
    assert (meta.outputs[0].name, list(meta.outputs[0].shape)) == ("probabilities", [-1, 10])
    config = client.get_model_config("digits").config
    assert config.max_batch_size > 0 and list(config.input[0].dims) == [64]
    assert "model_configuration" in client.get_server_metadata().extensions


def test_whole_digits_set_is_classified_accurately_through_the_coordinator(mesh):
    accuracy, params = _infer_all_digits(triton.InferenceServerClient(mesh.coordinator))
    assert accuracy >= 0.9
    assert params["cnei_node"].string_param in {"cloud-1", "edge-a1", "edge-b1"}


@pytest.mark.parametrize("node_id", ["edge-a1", "edge-b1"])
def test_whole_digits_set_is_classified_accurately_directly_on_an_edge_runtime(mesh, node_id):
    accuracy, params = _infer_all_digits(triton.InferenceServerClient(mesh.runtime(node_id)))
    assert accuracy >= 0.9
    assert params["cnei_node"].string_param == node_id


@pytest.mark.parametrize("precision", ["FP16", "INT8"])
def test_precision_parameter_selects_the_variant(mesh, precision):
    client = triton.InferenceServerClient(mesh.coordinator)
    x, _ = load_all()
    tensor = triton.InferInput("input", [4, 64], "FP32")
    tensor.set_data_from_numpy(x[:4])
    result = client.infer("digits", [tensor], parameters={"precision": precision})
    assert result.get_response().parameters["cnei_precision"].string_param == precision


def _expect_code(client, model, tensor, code, text):
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, [tensor])
    assert info.value.status() == str(code)
    assert text in info.value.message()


def _tensor(shape, datatype="FP32", dtype=np.float32):
    tensor = triton.InferInput("input", list(shape), datatype)
    tensor.set_data_from_numpy(np.zeros(shape, dtype=dtype))
    return tensor


@pytest.mark.parametrize("target", ["coordinator", "edge-a1"])
def test_bad_inputs_get_clear_status_codes(mesh, target):
    address = mesh.coordinator if target == "coordinator" else mesh.runtime(target)
    client = triton.InferenceServerClient(address)
    _expect_code(client, "no-such-model", _tensor((1, 64)), grpc.StatusCode.NOT_FOUND, "no-such-model")
    _expect_code(client, "digits", _tensor((1, 63)), grpc.StatusCode.INVALID_ARGUMENT, "shape [1, 63]")
    _expect_code(client, "digits", _tensor((1, 64), "FP64", np.float64),
                 grpc.StatusCode.INVALID_ARGUMENT, "datatype FP64")


@pytest.mark.parametrize("target", ["coordinator", "edge-a1"])
def test_metadata_and_configuration_of_no_model_name_are_not_found(mesh, target):
    client = triton.InferenceServerClient(mesh.coordinator if target == "coordinator" else mesh.runtime(target))
    try:
        for ask in (client.get_model_metadata, client.get_model_config):
            assert_refused(ask, "", status="NOT_FOUND", match="model '' not found")
    finally:
        client.close()


def test_raw_bytes_of_the_wrong_size_are_rejected_naming_the_tensor(mesh):
    from services.pb.inference import grpc_service_pb2 as pb
    from services.pb.inference import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(mesh.coordinator) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="digits", raw_input_contents=[b"\0" * 100])
        request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensor 'input'" in info.value.details() and "needs 256" in info.value.details()


def test_oversized_message_is_refused_and_the_server_keeps_serving(mesh):
    big = np.zeros((70 * 1024 * 1024 // 256, 64), np.float32)  # ~70 MB, over the 64 MB limit
    client = triton.InferenceServerClient(mesh.coordinator)
    tensor = triton.InferInput("input", list(big.shape), "FP32")
    tensor.set_data_from_numpy(big)
    with pytest.raises(InferenceServerException) as info:
        client.infer("digits", [tensor])
    assert info.value.status() == str(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert client.is_server_live()
    assert _infer_all_digits(client)[0] >= 0.9


def test_coordinator_without_live_nodes_answers_unavailable(mesh, redis_server, tmp_path):
    empty_redis = redis_server.rsplit("/", 1)[0] + "/7"
    proc, address, _, _ = start_coordinator(mesh, CNEI_COORDINATOR_REDIS_URL=empty_redis,
                                            CNEI_COORDINATOR_METRICS_PORT="0")
    try:
        client = triton.InferenceServerClient(address)
        assert not client.is_server_ready()
        _expect_code(client, "digits", _tensor((1, 64)), grpc.StatusCode.UNAVAILABLE, "no live node")
    finally:
        infra.stop(proc)
    assert proc.returncode == 0


def _rest(mesh, method, path, body=None):
    return rest_json(mesh.rest + path, method, body)


def test_rest_v2_health_metadata_and_infer(mesh):
    assert _rest(mesh, "GET", "/v2/health/live") == (200, {"live": True})
    assert _rest(mesh, "GET", "/v2/health/ready")[0] == 200
    status, meta = _rest(mesh, "GET", "/v2/models/digits")
    assert status == 200 and meta["inputs"][0]["shape"] == [-1, 64]
    x, y = load_all()
    body = {"inputs": [{"name": "input", "shape": [8, 64], "datatype": "FP32", "data": x[:8].tolist()}]}
    status, reply = _rest(mesh, "POST", "/v2/models/digits/infer", body)
    assert status == 200
    probs = np.asarray(reply["outputs"][0]["data"]).reshape(reply["outputs"][0]["shape"])
    assert (probs.argmax(axis=1) == y[:8]).mean() >= 0.75


@pytest.mark.parametrize("path,body,code,text", [
    ("/v2/models/nope/infer", {"inputs": []}, 404, "nope"),
    ("/v2/models/digits/infer", {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                             "data": [1.0] * 3}]}, 400, "tensor 'input'"),
    ("/v2/models/digits/infer", {"nothing": 1}, 400, "inputs"),
])
def test_rest_v2_bad_requests_get_http_errors(mesh, path, body, code, text):
    status, reply = _rest(mesh, "POST", path, body)
    assert status == code and text in reply["error"]


def test_one_request_makes_one_trace_across_coordinator_and_edge_runtime(mesh, jaeger):
    client = triton.InferenceServerClient(mesh.coordinator)
    _infer_all_digits(client)
    # Each hop of the request is a span: queue wait, placement, batch, cache lookup, ORT run.
    hops = {"coordinator.queue", "coordinator.placement", "coordinator.batch", "cache.lookup", "ort.run"}

    def runtime_spans(trace: dict) -> list[dict]:
        return [s for s in trace["spans"]
                if trace["processes"][s["processID"]]["serviceName"].startswith("cnei-runtime")]

    def whole(trace: dict) -> bool:
        """Every hop is there and every span's parent is a span of the trace. Spans reach Jaeger
        in batches as they end, each process on its own, so a trace read early may lack some."""
        span_ids = {s["spanID"] for s in trace["spans"]}
        return (hops <= {s["operationName"] for s in trace["spans"]}
                and all(ref["spanID"] in span_ids for s in trace["spans"] for ref in s["references"]))

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        services = set(jaeger.get("/api/services")["data"] or [])
        traces = jaeger.get("/api/traces?service=cnei-coordinator&limit=200")["data"] or []
        joined = [t for t in traces
                  if {p["serviceName"] for p in t["processes"].values()} >= {"cnei-coordinator", "cnei-runtime-edge"}
                  or {p["serviceName"] for p in t["processes"].values()} >= {"cnei-coordinator", "cnei-runtime-cloud"}]
        complete = [t for t in joined if whole(t)]
        if complete:
            break
        time.sleep(0.5)
    assert "cnei-coordinator" in services
    assert joined, f"no trace spans both coordinator and a runtime (services: {services})"
    assert complete, ("no trace holds every hop with each span's parent within 20 s; span names seen: "
                      f"{sorted({s['operationName'] for t in joined for s in t['spans']})}")
    trace = complete[0]
    assert any(s["references"] for s in runtime_spans(trace))  # the runtime's spans hang off the coordinator's
    names = {s["operationName"] for s in trace["spans"]}
    assert hops <= names, names
    placement = next(s for s in trace["spans"] if s["operationName"] == "coordinator.placement")
    tags = {t["key"]: t["value"] for t in placement["tags"]}
    assert tags["cnei.outcome"] == "placed" and tags["cnei.node"]


def test_prometheus_metrics_count_requests_by_model_and_outcome(mesh):
    client = triton.InferenceServerClient(mesh.coordinator)
    _infer_all_digits(client)
    with urllib.request.urlopen(f"http://127.0.0.1:{mesh.settings.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    ok_lines = [line for line in text.splitlines()
                if line.startswith('cnei_inference_requests_total{model="digits",outcome="ok"}')]
    assert ok_lines and float(ok_lines[0].split()[-1]) >= 2
    assert "cnei_inference_request_duration_seconds_bucket" in text
    # The same requests by the variant and node that served them.
    served = [line for line in text.splitlines() if line.startswith("cnei_coordinator_requests_total{")
              and 'model="digits"' in line and 'outcome="ok"' in line]
    assert served and not any(f'{label}=""' in line for line in served
                              for label in ("version", "precision", "node", "tier"))
    assert sum(float(line.split()[-1]) for line in served) >= 2


def test_perf_analyzer_runs_to_completion_against_the_coordinator(mesh):
    assert "Concurrency: 2, throughput:" in run_perf_analyzer("digits", mesh.coordinator)


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_runtime_metrics_account_compute_time_energy_and_cost_per_inference(mesh):
    client = triton.InferenceServerClient(mesh.runtime("edge-b1"))
    _infer_all_digits(client)
    port = mesh.settings.runtime_metrics_base_port + 2  # edge-b1
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    labels = {"model": "digits", "node": "edge-b1", "tier": "edge"}
    assert _metric(text, "cnei_runtime_inferences_total", **labels) >= 1797
    assert _metric(text, "cnei_runtime_compute_seconds_count", **labels) >= 8
    assert _metric(text, "cnei_inference_energy_joules_total", **labels, source="cpu") > 0  # CPU build
    assert _metric(text, "cnei_inference_cost_total", **labels) > 0
    assert _metric(text, "cnei_model_cache_events_total", event="hit") > 0


def test_a_runtime_s_model_config_says_how_it_runs_the_loaded_variant(mesh):
    """Triton's onnxruntime backend names the session's threads `intra_op_thread_count`; a runtime
    chooses them per model when it loads it (digits is too small to split: one thread)."""
    runtime = triton.InferenceServerClient(mesh.runtime("edge-a1"))
    _infer_all_digits(runtime)  # loaded (and kept loaded) by now
    config = runtime.get_model_config("digits").config
    assert config.parameters["intra_op_thread_count"].string_value == "1"
    assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU
    coordinator = triton.InferenceServerClient(mesh.coordinator).get_model_config("digits").config
    assert "intra_op_thread_count" not in coordinator.parameters  # the coordinator runs no session
