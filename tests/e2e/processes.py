"""Processes for end-to-end tests: an extra coordinator or edge runtime joining the session's
mesh, a process's children, and closed-loop tritonclient load that records every outcome."""
from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import tritonclient.grpc as triton
import tritonclient.utils as triton_utils

from services.cli import infra
from services.common.deployment import DeploymentSpec
from services.common.registry_client import RegistryClient
from services.models.digits import load_all
from services.pb.inference import grpc_service_pb2 as pb


def server_ready(address: str) -> bool:
    """Whether the OIP server at `address` answers ServerReady with true (false when it cannot)."""
    client = triton.InferenceServerClient(address)
    try:
        return client.is_server_ready()
    except triton_utils.InferenceServerException:
        return False
    finally:
        client.close()


def rest_json(url: str, method: str = "GET", body: object | None = None, timeout: float = 10) -> tuple[int, object]:
    """(status, JSON body) of one REST call at `url`, an HTTP error's status and body included."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def assert_refused(call, *args, status: str, match: str) -> None:
    """`call(*args)` (a tritonclient gRPC method) raises with gRPC `status` (e.g. "NOT_FOUND") and
    a message matching `match`."""
    try:
        call(*args)
    except triton_utils.InferenceServerException as exc:
        assert exc.status() == f"StatusCode.{status}", (exc.status(), exc.message())
        assert re.search(match, exc.message()), exc.message()
    else:
        raise AssertionError(f"{getattr(call, '__name__', call)}{args} was not refused")


def answered_by_door(reply) -> bool:
    """Whether the front door answered a tritonclient gRPC reply itself (its `cnei_front_door`)."""
    params = reply.get_response().parameters
    return "cnei_front_door" in params and params["cnei_front_door"].bool_param


def door_requests(metrics_port: int, model: str, outcome: str) -> float:
    """The coordinator's `cnei_front_door_requests_total` of `model` with `outcome` (0 when none)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = re.findall(rf'^cnei_front_door_requests_total{{model="{model}",outcome="{outcome}"}} (\S+)', text, re.M)
    return float(found[0]) if found else 0.0


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def start_coordinator(mesh, export_spans: bool = True, **env_extra: str) -> tuple[subprocess.Popen, str, int, int]:
    """A coordinator of the mesh's registry, Redis and NATS on fresh ports, its gRPC port open:
    (process, gRPC address, REST port, metrics port). `env_extra` overrides its environment."""
    grpc_port, http_port, metrics_port = infra.free_port(), infra.free_port(), infra.free_port()
    env = {k: v for k, v in os.environ.items() if export_spans or k != "OTEL_EXPORTER_OTLP_ENDPOINT"}
    env.update({"CNEI_COORDINATOR_GRPC_PORT": str(grpc_port), "CNEI_COORDINATOR_HTTP_PORT": str(http_port),
                "CNEI_COORDINATOR_METRICS_PORT": str(metrics_port), "CNEI_COORDINATOR_REGISTRY_TARGET": mesh.registry,
                "CNEI_COORDINATOR_REDIS_URL": mesh.settings.redis_url,
                "CNEI_COORDINATOR_NATS_URL": mesh.settings.nats_url, **env_extra})
    return spawn("services.coordinator", env, grpc_port, 60), f"127.0.0.1:{grpc_port}", http_port, metrics_port


def start_door(mesh, **env_extra: str) -> tuple[subprocess.Popen, str, int]:
    """A coordinator with its compiled front door on fresh ports, ready: (process, gRPC address,
    metrics port); exports no spans unless `env_extra` names an OTLP endpoint."""
    proc, address, _, metrics_port = start_coordinator(mesh, export_spans="OTEL_EXPORTER_OTLP_ENDPOINT" in env_extra,
                                                       CNEI_COORDINATOR_FRONT_DOOR="on", **env_extra)
    try:
        infra.wait_until(lambda: server_ready(address), 30, "the coordinator ready behind its door")
    except BaseException:
        infra.stop(proc)
        raise
    return proc, address, metrics_port


def spawn(module: str, env: dict[str, str], port: int, timeout: float = 30) -> subprocess.Popen:
    """`python -m module` with exactly `env`, once its port answers (stopped if it never does)."""
    proc = subprocess.Popen([sys.executable, "-m", module], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        infra.wait_for_port("127.0.0.1", port, proc=proc, timeout=timeout)
    except BaseException:
        infra.stop(proc)
        raise
    return proc


def start_runtime(mesh, node_id: str, region: str, tmp_path, port: int = 0,
                  **env_extra: str) -> tuple[subprocess.Popen, int]:
    """An edge runtime of the mesh's on `port` (0: a free one; `env_extra`: more CNEI_RUNTIME_* settings)."""
    port = port or infra.free_port()
    env = {**os.environ, "CNEI_RUNTIME_NODE_ID": node_id, "CNEI_RUNTIME_TIER": "edge",
           "CNEI_RUNTIME_REGION": region, "CNEI_RUNTIME_PORT": str(port),
           "CNEI_RUNTIME_METRICS_PORT": "0", "CNEI_RUNTIME_REGISTRY_TARGET": mesh.registry,
           "CNEI_RUNTIME_REDIS_URL": mesh.settings.redis_url, "CNEI_RUNTIME_NATS_URL": mesh.settings.nats_url,
           "CNEI_RUNTIME_CACHE_DIR": str(tmp_path / node_id), "CNEI_RUNTIME_PRELOAD": "digits", **env_extra}
    return spawn("services.edge_runtime", env, port), port


def start_fast_runtime(mesh, node_id: str, region: str, tmp_path, port: int = 0, fast_port: int = 0,
                       **env_extra: str) -> tuple[subprocess.Popen, str, str]:
    """start_runtime with its fast lane on a known port (0: free ones), open: (process, gRPC
    address, fast-lane address)."""
    fast_port = fast_port or infra.free_port()
    proc, port = start_runtime(mesh, node_id, region, tmp_path, port, CNEI_RUNTIME_FAST_PORT=str(fast_port), **env_extra)
    try:
        infra.wait_for_port("127.0.0.1", fast_port, proc=proc, timeout=30)  # opens after the gRPC port
    except BaseException:
        infra.stop(proc)
        raise
    return proc, f"127.0.0.1:{port}", f"127.0.0.1:{fast_port}"


def who_served(client: triton.InferenceServerClient, region: str, count: int) -> collections.Counter:
    """`count` one-row digits requests placed in `region`: how many each (node, answered by the
    front door) served."""
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 64), np.float32))
    served = collections.Counter()
    for _ in range(count):
        reply = client.infer("digits", [tensor], parameters={"region": region}, client_timeout=30)
        params = reply.get_response().parameters
        served[(params["cnei_node"].string_param,
                "cnei_front_door" in params and params["cnei_front_door"].bool_param)] += 1
    return served


def digits_payload() -> bytes:
    """A one-row digits ModelInferRequest, serialized as a fast-lane request carries it."""
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(np.ones((1, 64), np.float32).tobytes())
    return request.SerializeToString()


class Workers:
    """Threads running `_run(index)` until the block ends (`with`): started on entry, stopped
    and joined on exit."""

    def __init__(self, threads: int):
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, index: int) -> None:
        raise NotImplementedError

    def __enter__(self):
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for w in self._workers:
            w.join(timeout=30)


class Load(Workers):
    """Closed-loop tritonclient load from several threads; records every outcome."""

    def __init__(self, address: str, threads: int, region: str, model: str = "digits"):
        super().__init__(threads)
        self.address, self.threads, self.region, self.model = address, threads, region, model
        self.results: list[tuple[float, float, str]] = []  # (start, latency, node)
        self.served: collections.Counter[tuple[str, str]] = collections.Counter()  # (version, node): answers
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def _run(self, index: int) -> None:
        client = triton.InferenceServerClient(self.address)
        x, _ = load_all()
        i = index
        while not self._stop.is_set():
            sample = x[i % len(x)][None, :]
            tensor = triton.InferInput("input", [1, 64], "FP32")
            tensor.set_data_from_numpy(sample)
            start = time.monotonic()
            try:
                reply = client.infer(self.model, [tensor], parameters={"region": self.region},
                                     client_timeout=10).get_response()
                node = reply.parameters["cnei_node"].string_param
                with self._lock:
                    self.results.append((start, time.monotonic() - start, node))
                    self.served[(reply.model_version, node)] += 1
            except Exception as exc:  # noqa: BLE001 - counted as a failed request
                with self._lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}")
            i += self.threads


def kill_under_load(address: str, victim: subprocess.Popen, node_id: str, region: str,
                    before_s: float, after_s: float) -> tuple[Load, int, float]:
    """Load `region` through `address`, kill -9 the runtime `node_id` after `before_s`, keep the
    load on for `after_s`: (the load, requests the victim answered before, when it was killed)."""
    time.sleep(1.5)  # the coordinator sees the new node
    with Load(address, threads=6, region=region) as load:
        time.sleep(before_s)
        served_by_victim = sum(1 for r in load.results if r[2] == node_id)
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        time.sleep(after_s)
    return load, served_by_victim, killed_at


def run_cnei(*args: str, env: dict[str, str | None] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`cnei ARGS` as a user runs it, whatever its exit status; `env`: changes to this process's
    environment (None removes a variable)."""
    environment = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            environment.pop(key, None)
        else:
            environment[key] = value
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args], capture_output=True, text=True,
                          timeout=timeout, env=environment)


def put_deployment(mesh, spec: DeploymentSpec) -> None:
    """Apply a deployment spec at the mesh's registry."""
    async def put() -> None:
        client = RegistryClient(mesh.registry)
        try:
            await client.put_deployment(spec)
        finally:
            await client.close()
    asyncio.run(put())


def push_digits_as(mesh, digits_models, name: str, version: str = "1") -> str:
    """Register the digits FP32 file as `version` of model `name` (a model a test may change)."""
    fp32 = next(v for v in digits_models if v.precision == "FP32")

    async def push():
        client = RegistryClient(mesh.registry)
        try:
            await client.push_file(fp32.path, name, version, "FP32", fp32.metadata)
        finally:
            await client.close()

    asyncio.run(push())
    return name


def run_perf_analyzer(model: str, address: str, *extra: str) -> str:
    """Triton's perf_analyzer against `address` at concurrency 2 (short windows): its output,
    once it exited 0. Skips the test when perf_analyzer is not installed (make perf-analyzer)."""
    import pytest

    binary = os.path.join(os.path.dirname(sys.executable), "perf_analyzer")
    try:
        usable = subprocess.run([binary, "--version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        usable = False
    if not usable:
        pytest.skip("Triton's perf_analyzer is not installed (make perf-analyzer)")
    result = subprocess.run(
        [binary, "-m", model, "-u", address, "-i", "grpc", "--measurement-interval", "500",
         "--concurrency-range", "2", "--stability-percentage", "100", "--max-trials", "5", *extra],
        capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout
