"""Energy of one ONNX Runtime call: the GPU's own power reading over NVML when the model runs on
CUDA, else CPU seconds × the configured watts per busy core."""
from __future__ import annotations

import logging
from typing import Any, Protocol

log = logging.getLogger(__name__)
SOURCES = ("auto", "cpu", "nvml")
CUDA = "CUDAExecutionProvider"


class EnergyMeter(Protocol):
    source: str

    def joules(self, cpu_seconds: float, wall_seconds: float) -> float: ...


class CpuEnergy:
    """CPU time × watts per core: what the call cost the cores that ran it."""

    source = "cpu"

    def __init__(self, watts_per_core: float):
        self.watts_per_core = watts_per_core

    def joules(self, cpu_seconds: float, wall_seconds: float) -> float:
        return cpu_seconds * self.watts_per_core


class NvmlEnergy:
    """Board power read from NVML at the end of the call × the call's wall time."""

    source = "nvml"

    def __init__(self, nvml: Any, index: int = 0):
        self.nvml = nvml
        self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self.name = _text(nvml.nvmlDeviceGetName(self.handle))

    def power_watts(self) -> float:
        return self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0  # milliwatts

    def total_joules(self) -> float:
        """The board's energy counter since the driver loaded (Volta and newer)."""
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0  # millijoules

    def joules(self, cpu_seconds: float, wall_seconds: float) -> float:
        return self.power_watts() * wall_seconds


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def open_nvml(index: int = 0) -> NvmlEnergy | None:
    """An NVML meter for GPU `index`, or None where there is no NVML (package, driver or GPU)."""
    try:
        import pynvml  # the nvidia-ml-py package: `pip install .[gpu]`

        pynvml.nvmlInit()
        return NvmlEnergy(pynvml, index)
    except Exception as exc:  # noqa: BLE001 - missing package, driver or device: no NVML
        log.info("NVML energy readings unavailable (%s: %s)", type(exc).__name__, exc)
        return None


def check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"energy source {source!r} must be one of {list(SOURCES)}")


def choose_meter(source: str, provider: str, cpu: CpuEnergy, nvml: NvmlEnergy | None) -> EnergyMeter:
    """`auto`: NVML for models on CUDA when NVML answers, else CPU; `nvml`: NVML whenever it
    answers (the GPU's power, whatever ran); `cpu`: always CPU time × watts."""
    check_source(source)
    if nvml is not None and (source == "nvml" or (source == "auto" and provider == CUDA)):
        return nvml
    return cpu
