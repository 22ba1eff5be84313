"""Seldon MLServer (separate virtualenv) serving the same ONNX files: repository, start, stop."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from services.cli import infra

BENCH_DIR = Path(__file__).resolve().parent
VENV = BENCH_DIR.parent / ".bench" / "mlserver-venv"
INSTALL_HINT = ("make bench creates it, or: python3 -m venv .bench/mlserver-venv && "
                ".bench/mlserver-venv/bin/pip install mlserver==1.7.1 'uvloop<0.22' onnxruntime numpy")
INTRA_OP_THREADS = 2
# Adaptive batching: up to 32 requests, waiting at most 2 ms for the batch to fill.
BATCH_MAX_SIZE = 32
BATCH_MAX_TIME_S = 0.002


@dataclass(frozen=True)
class MLServerConfig:
    """One MLServer set-up: inference in the main process (0) or in N worker processes."""

    parallel_workers: int
    adaptive_batching: bool

    @property
    def name(self) -> str:
        return f"mlserver-w{self.parallel_workers}" + ("-ab" if self.adaptive_batching else "")


CONFIGS = [MLServerConfig(w, ab) for w in (0, 1) for ab in (False, True)]


def python() -> Path:
    path = VENV / "bin" / "python"
    if not path.exists():
        raise FileNotFoundError(f"MLServer virtualenv not found at {VENV}; {INSTALL_HINT}")
    return path


def model_settings(name: str, onnx_path: Path, config: MLServerConfig) -> dict:
    settings = {
        "name": name, "implementation": "mlserver_runtime.OnnxModel",
        "parameters": {"uri": str(onnx_path.resolve()), "version": "1",
                       "extra": {"intra_op_threads": INTRA_OP_THREADS}},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
    }
    if config.adaptive_batching:
        settings.update(max_batch_size=BATCH_MAX_SIZE, max_batch_time=BATCH_MAX_TIME_S)
    return settings


def write_repository(root: Path, config: MLServerConfig, models: dict[str, Path], ports: dict[str, int]) -> Path:
    """settings.json (explicit ports, access log off) plus one model-settings.json per model."""
    folder = root / config.name
    folder.mkdir(parents=True, exist_ok=True)
    server = {"debug": False, "parallel_workers": config.parallel_workers, "host": "127.0.0.1",
              "http_port": ports["http"], "grpc_port": ports["grpc"], "metrics_port": ports["metrics"],
              "metrics_dir": str(folder / "metrics")}
    (folder / "settings.json").write_text(json.dumps(server, indent=1))
    for name, path in models.items():
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "model-settings.json").write_text(
            json.dumps(model_settings(name, path, config), indent=1))
    return folder


class MLServerProcess:
    """`mlserver start` (through bench/mlserver_launch.py) in its own process group."""

    def __init__(self, folder: Path, log_file: Path):
        self.folder = folder
        self.log_file = log_file
        self.grpc_port = json.loads((folder / "settings.json").read_text())["grpc_port"]
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, models: list[str], timeout: float = 120.0) -> None:
        env = {**os.environ, "PYTHONPATH": str(BENCH_DIR)}
        env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
        with open(self.log_file, "ab") as out:
            self.proc = subprocess.Popen(
                [str(python()), str(BENCH_DIR / "mlserver_launch.py"), str(self.folder)],
                cwd=self.folder, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        infra.wait_for_port("127.0.0.1", self.grpc_port, timeout=timeout, proc=self.proc)
        wait_models_ready(self.target, models, timeout, self.proc)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (MLServer stops its workers), then SIGKILL to the whole group after `timeout`."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def wait_models_ready(target: str, models: list[str], timeout: float, proc: subprocess.Popen) -> None:
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(target)
    deadline = time.monotonic() + timeout
    try:
        for name in models:
            while not _ready(client, name):
                if proc.poll() is not None:
                    raise RuntimeError(f"MLServer exited with {proc.returncode} while loading {name}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"MLServer model {name} not ready within {timeout}s")
                time.sleep(0.2)
    finally:
        client.close()


def _ready(client, name: str) -> bool:
    try:
        return client.is_model_ready(name)
    except Exception:  # noqa: BLE001 - not loaded yet
        return False
