"""Device check for a GPU host: the runtime's provider choice and its clean CPU fallback.

Run on a machine with an NVIDIA GPU (the `device` tool): prints what ONNX Runtime offers,
which providers the edge runtime picks with use_cuda=True, and runs the digits model through
the runtime's OrtModel, and reads the GPU's power and energy counter through the runtime's NVML
energy meter (nvidia-ml-py on PYTHONPATH), writing a JSON report to $OUT (or the current
directory)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import onnxruntime as ort

    from services.edge_runtime.runner import OrtModel, choose_providers
    from services.models import digits

    report: dict = {"onnxruntime": ort.__version__, "available": ort.get_available_providers()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        report["gpu"] = smi.stdout.strip() or smi.stderr.strip()
    except OSError as exc:
        report["gpu"] = f"nvidia-smi unavailable: {exc}"
    report["chosen_with_cuda"] = choose_providers(True)
    report["chosen_without_cuda"] = choose_providers(False)
    built = digits.build(Path(tempfile.mkdtemp()))
    x, y = digits.load_all()
    for variant in built:
        model = OrtModel(variant.path, use_cuda=True, intra_op_threads=4)
        start = time.perf_counter()
        probs = model.run({"input": x})["probabilities"]
        report[variant.precision] = {
            "provider": model.provider, "accuracy": float((probs.argmax(1) == y).mean()),
            "batch_1797_ms": (time.perf_counter() - start) * 1e3,
        }
    report["energy"] = energy_check(built[0].path, x)
    report["auto_threads"] = threads_check()
    ok = all(report[p]["accuracy"] >= 0.9 for p in ("FP32", "FP16", "INT8"))
    ok = ok and report["chosen_with_cuda"][-1] == "CPUExecutionProvider"
    report["ok"] = ok
    text = json.dumps(report, indent=1)
    print(text)
    Path(os.environ.get("OUT", "."), "gpu_check.json").write_text(text)
    return 0 if ok else 1


def threads_check() -> dict:
    """The runtime's automatic intra-op threads on this host's cores, asked for CUDA: wide_mlp
    FP32 (compute-bound: several threads pay) and digits FP32 (tiny: one thread)."""
    import numpy as np

    from services.edge_runtime.runner import available_cores, measure_latency_ms, tuned_model
    from services.models import digits, wide_mlp

    cores = available_cores()
    out: dict = {"cores": cores}
    for name, module, width in (("wide_mlp", wide_mlp, 64), ("digits", digits, 64)):
        path = next(v.path for v in module.build(Path(tempfile.mkdtemp())) if v.precision == "FP32")
        inputs = {"input": np.random.default_rng(0).random((16, width), dtype=np.float32)}
        model = tuned_model(path, True, inputs, cores, name)
        out[name] = {"provider": model.provider, "intra_op_threads": model.intra_op_threads,
                     "batch16_ms": measure_latency_ms(model, inputs)}
    return out


def energy_check(path: Path, x) -> dict:
    """The runtime's meters on this host: NVML readings, the meter chosen for the CPU-provider
    model (auto: CPU), and NVML power × wall time beside the board's energy counter over 2 s."""
    from services.edge_runtime.energy import CpuEnergy, choose_meter, open_nvml
    from services.edge_runtime.runner import OrtModel

    nvml = open_nvml(0)
    model = OrtModel(path, use_cuda=True, intra_op_threads=4)
    cpu = CpuEnergy(15.0)
    out = {"nvml": nvml is not None,
           "auto_meter_for_" + model.provider: choose_meter("auto", model.provider, cpu, nvml).source,
           "auto_meter_if_cuda": choose_meter("auto", "CUDAExecutionProvider", cpu, nvml).source}
    if nvml is None:
        return out
    counter_start, metered, calls = nvml.total_joules(), 0.0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < 2.0:
        t0, c0 = time.perf_counter(), time.thread_time()
        model.run({"input": x})
        metered += nvml.joules(time.thread_time() - c0, time.perf_counter() - t0)
        calls += 1
    wall = time.perf_counter() - start
    out.update({"gpu": nvml.name, "power_watts": nvml.power_watts(), "calls": calls,
                "metered_joules": metered, "counter_joules": nvml.total_joules() - counter_start,
                "wall_s": wall})
    return out


if __name__ == "__main__":
    sys.exit(main())
