"""Energy per call: which meter a model gets, and what each one computes."""
from __future__ import annotations

import pytest

from services.edge_runtime.energy import CUDA, CpuEnergy, NvmlEnergy, choose_meter, open_nvml


class FakeNvml:
    """The few pynvml calls NvmlEnergy makes, answering like an H100 drawing 250 W."""

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetPowerUsage(self, handle):
        return 250_000  # milliwatts

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        return 7_200_000  # millijoules


CPU = CpuEnergy(watts_per_core=15.0)
NVML = NvmlEnergy(FakeNvml(), 0)


def test_cpu_energy_is_cpu_seconds_times_watts_per_core():
    assert CPU.joules(cpu_seconds=0.002, wall_seconds=0.5) == pytest.approx(0.03)


def test_nvml_energy_is_board_power_times_wall_time_and_reads_the_energy_counter():
    assert NVML.name == "NVIDIA H100 80GB HBM3"
    assert NVML.power_watts() == pytest.approx(250.0)
    assert NVML.joules(cpu_seconds=0.0001, wall_seconds=0.002) == pytest.approx(0.5)
    assert NVML.total_joules() == pytest.approx(7200.0)


@pytest.mark.parametrize("source, provider, nvml, expected", [
    ("auto", CUDA, NVML, "nvml"),
    ("auto", "CPUExecutionProvider", NVML, "cpu"),  # the GPU's power is not what a CPU run cost
    ("auto", CUDA, None, "cpu"),  # no NVML: fall back, never fail
    ("nvml", "CPUExecutionProvider", NVML, "nvml"),
    ("nvml", CUDA, None, "cpu"),
    ("cpu", CUDA, NVML, "cpu"),
])
def test_the_meter_follows_the_source_setting_and_the_models_provider(source, provider, nvml, expected):
    assert choose_meter(source, provider, CPU, nvml).source == expected


def test_an_unknown_energy_source_is_rejected():
    with pytest.raises(ValueError, match="energy source 'solar'"):
        choose_meter("solar", CUDA, CPU, NVML)


def test_open_nvml_answers_none_without_a_gpu_driver_instead_of_failing():
    meter = open_nvml()
    assert meter is None or meter.power_watts() >= 0  # a GPU machine answers with a reading
