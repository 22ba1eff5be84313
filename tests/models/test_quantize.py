"""INT8 quantisation of an MLP with ONNX Runtime's tooling, and what it logs."""
from __future__ import annotations

import logging

import onnx

from services.models.onnx_mlp import mlp_graph, quantize_int8
from services.models.wide_mlp import random_weights


def test_quantising_logs_not_onnx_runtimes_advice_to_pre_process_and_other_warnings_still_show(tmp_path, caplog):
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    onnx.save(mlp_graph(*random_weights((8, 16, 4), seed=1), name="small"), fp32)
    with caplog.at_level(logging.WARNING):
        quantize_int8(fp32, int8)
        logging.getLogger().warning("Please consider to run pre-processing before quantization (said after the call)")
    assert int8.stat().st_size > 0
    assert [r.getMessage() for r in caplog.records] == [
        "Please consider to run pre-processing before quantization (said after the call)"]
