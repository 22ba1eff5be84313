"""Execution provider choice of the edge runtime's ONNX Runtime runner."""
from __future__ import annotations

import pytest

from services.edge_runtime.runner import choose_providers

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
