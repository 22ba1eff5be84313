"""Execution provider choice of the edge runtime's ONNX Runtime runner."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from services.common.errors import TensorError
from services.edge_runtime.runner import OrtModel, auto_threads, choose_providers, tuned_model

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
