"""Execution provider choice of the edge runtime's ONNX Runtime runner."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from services.common.errors import CneiError, ErrorCode, TensorError
from services.edge_runtime.runner import ORT_FAILURES, OrtModel, auto_threads, choose_providers, run_error, tuned_model

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


@pytest.mark.parametrize(
    ("use_cuda", "available", "expected"),
    [
        (True, [TRT, CUDA, CPU], [CUDA, CPU]),
        (True, [CUDA, CPU], [CUDA, CPU]),
        (True, [CPU], [CPU]),
        (True, [], [CPU]),
        (False, [CUDA, CPU], [CPU]),
        (False, [CPU], [CPU]),
    ],
    ids=["cuda-among-others", "cuda-present", "cuda-absent", "nothing-reported",
         "cuda-not-asked", "cpu-only"],
)
def test_cuda_is_chosen_only_when_asked_for_and_available_with_cpu_as_fallback(use_cuda, available, expected):
    assert choose_providers(use_cuda, available) == expected


def test_without_cuda_the_choice_is_cpu_whatever_onnxruntime_offers():
    assert choose_providers(False) == [CPU]


# --- automatic intra-op threads (intra_op_threads = 0) ---------------------------------------

@pytest.mark.parametrize(
    ("one_ms", "many_ms", "many", "expected"),
    [
        (3.6, 1.8, 2, 2),     # wide_mlp FP32 at 16 rows here: twice as fast on both cores
        (1.0, 0.8, 2, 2),     # exactly MIN_SPEEDUP
        (1.0, 0.85, 2, 1),    # not enough faster to pay for the wake-ups
        (0.3, 0.1, 2, 1),     # too small a call to split, however fast the split one looks
        (5.0, 1.0, 1, 1),     # one core: nothing to choose
        (2.0, 2.5, 4, 1),     # slower on several threads
    ],
    ids=["pays", "at-the-line", "not-enough", "too-small", "one-core", "slower"],
)
def test_several_threads_are_kept_only_when_a_big_enough_call_runs_enough_faster(one_ms, many_ms, many, expected):
    assert auto_threads(one_ms, many_ms, many) == expected


def _digits_fp32(digits_models):
    return next(v for v in digits_models if v.precision == "FP32")


def test_a_tuned_session_on_one_core_has_one_thread_and_serves(digits_models):
    built = _digits_fp32(digits_models)
    inputs = {"input": np.zeros((16, 64), np.float32)}
    model = tuned_model(built.path, False, inputs, cores=1)
    assert model.intra_op_threads == 1
    assert model.run(inputs)[model.output_names[0]].shape[0] == 16


def test_a_small_model_keeps_one_thread_and_answers_as_an_untuned_session(digits_models):
    built = _digits_fp32(digits_models)
    x = np.random.default_rng(0).random((16, 64), dtype=np.float32)
    model = tuned_model(built.path, False, {"input": x}, cores=4)
    assert model.intra_op_threads == 1  # digits runs 16 rows in tens of µs: below MIN_SPLIT_MS
    plain = OrtModel(built.path, False, 1)
    for name in plain.output_names:
        np.testing.assert_allclose(model.run({"input": x})[name], plain.run({"input": x})[name], rtol=1e-6)


def test_inputs_the_model_cannot_run_leave_it_on_one_thread_with_a_warning(digits_models, caplog):
    built = _digits_fp32(digits_models)
    model = tuned_model(built.path, False, {"not-an-input": np.zeros((16, 64), np.float32)}, cores=4)
    assert model.intra_op_threads == 1
    assert "keeps one" in caplog.text


@pytest.fixture
def string_identity(tmp_path) -> OrtModel:
    """A model whose STRING output `o` is its STRING input `s`, [n, 1]."""
    graph = helper.make_graph([helper.make_node("Identity", ["s"], ["o"])], "string-identity",
                              [helper.make_tensor_value_info("s", TensorProto.STRING, ["n", 1])],
                              [helper.make_tensor_value_info("o", TensorProto.STRING, ["n", 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "string-identity.onnx")
    return OrtModel(tmp_path / "string-identity.onnx", False, 1)


@pytest.mark.parametrize("sent", [
    [[b"hello"], [b"world"]],
    [["hello".encode()], ["h\u00e9llo \u2603".encode()]],
    [[b""], [b"b'quoted'"]],
], ids=["ascii", "utf-8", "empty-and-quotes"])
def test_bytes_inputs_reach_a_string_model_as_their_text_and_come_back_as_the_same_bytes(string_identity, sent):
    inputs = np.empty((len(sent), 1), dtype=object)
    inputs[:] = sent
    got = string_identity.run({"s": inputs})["o"]
    assert got.dtype == object and got.shape == (len(sent), 1)
    assert got.tolist() == sent
    assert all(type(item) is bytes for item in got.ravel())


def test_bytes_inputs_that_are_not_utf_8_are_refused_naming_the_tensor(string_identity):
    inputs = np.array([[b"ok"], [b"\xff\xfe"]], dtype=object)
    with pytest.raises(TensorError, match="tensor 's': element 1 is not UTF-8"):
        string_identity.run({"s": inputs})


# --- ONNX Runtime's failures as OIP codes ------------------------------------------------------

def _saved(path, nodes, inputs, outputs, initializers=()) -> OrtModel:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return OrtModel(path, False, 1)


@pytest.fixture
def lookup(tmp_path) -> OrtModel:
    """A table of 10 rows looked up by the INT64 indices `idx` [n] (Gather): `row` [n, 1]."""
    table = helper.make_tensor("table", TensorProto.FLOAT, [10, 1], [float(i) for i in range(10)])
    return _saved(tmp_path / "lookup.onnx", [helper.make_node("Gather", ["table", "idx"], ["row"], axis=0)],
                  [helper.make_tensor_value_info("idx", TensorProto.INT64, ["n"])],
                  [helper.make_tensor_value_info("row", TensorProto.FLOAT, ["n", 1])], [table])


@pytest.fixture
def misshapen(tmp_path) -> OrtModel:
    """A model that loads and fails every run: `x` [n, 4] reshaped to a constant [7]."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [1], [7])
    return _saved(tmp_path / "misshapen.onnx", [helper.make_node("Reshape", ["x", "shape"], ["y"])],
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7])], [shape])


def test_an_index_out_of_range_is_invalid_argument_with_onnx_runtime_s_message(lookup):
    assert lookup.run({"idx": np.array([3], np.int64)})["row"].tolist() == [[3.0]]
    with pytest.raises(CneiError) as refused:
        lookup.run({"idx": np.array([1, 42], np.int64)})
    assert refused.value.code is ErrorCode.INVALID_ARGUMENT
    assert "indices element out of data bounds, idx=42 must be within the inclusive range [-10,9]" \
        in refused.value.message
    assert refused.value.message.startswith("onnx runtime: Non-zero status code returned while running Gather node")


def test_a_model_failing_at_run_time_is_internal_and_logged(misshapen, caplog):
    with pytest.raises(CneiError) as failed:
        misshapen.run({"x": np.ones((2, 4), np.float32)})
    assert failed.value.code is ErrorCode.INTERNAL
    assert "The input tensor cannot be reshaped to the requested shape" in failed.value.message
    assert "cannot be reshaped" in caplog.text


@pytest.mark.parametrize("failure", [c for c in ORT_FAILURES if c is not ort_state.InvalidArgument],
                         ids=lambda c: c.__name__)
def test_every_other_onnx_runtime_failure_is_internal(failure):
    error = run_error(failure("[ONNXRuntimeError] : 1 : FAIL : it broke\n"))
    assert (error.code, error.message) == (ErrorCode.INTERNAL, "onnx runtime: it broke")


def test_onnx_runtime_s_failure_classes_include_those_of_run_time():
    assert {ort_state.InvalidArgument, ort_state.Fail, ort_state.RuntimeException, ort_state.EPFail,
            ort_state.NotImplemented} <= set(ORT_FAILURES)
