"""A registry outage with real processes (NATS, Redis, registry, an edge runtime, coordinators with
and without the front door): the coordinator keeps serving the models it knew from their last
known variants and deployments while the registry is killed or frozen, applies the events that
still arrive, says so on its metrics, status page and log, and fails only models it never knew,
UNAVAILABLE naming the registry."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from services.cli import infra
from services.common import events
from services.common.bus import EventBus
from services.common.registry_client import RegistryClient
from services.coordinator.door_process import door_binary
from tests.e2e.processes import answered_by_door, server_ready

RESOLVE_TTL_S = 0.3  # registry answers go stale fast: each request below reads past it
REGISTRY_TIMEOUT_S = 1.0
DOORS = ["off", "on"] if door_binary("auto") is not None else ["off"]


@dataclass
class Site:
    """One registry, one edge runtime and a coordinator per front-door mode, on their own NATS
    and Redis; the registry killed, frozen and started again on the same port and data."""

    root: Path
    registry_port: int = field(default_factory=infra.free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    coordinators: dict[str, tuple[str, int, int, Path]] = field(default_factory=dict)

    def __post_init__(self):
        self.nats_url = f"nats://127.0.0.1:{infra.free_port()}"
        self.redis_url = f"redis://127.0.0.1:{infra.free_port()}/0"

    @property
    def registry(self) -> str:
        return f"127.0.0.1:{self.registry_port}"

    def spawn(self, name: str, module: str, env: dict[str, str], port: int) -> None:
        env = {k: v for k, v in os.environ.items() if k != "OTEL_EXPORTER_OTLP_ENDPOINT"} | env
        with (self.root / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", module], env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        infra.wait_for_port("127.0.0.1", port, proc=proc, timeout=60)

    def start_registry(self) -> None:
        self.spawn("registry", "services.registry", {
            "CNEI_REGISTRY_PORT": str(self.registry_port), "CNEI_REGISTRY_METRICS_PORT": "0",
            "CNEI_REGISTRY_DATA_DIR": str(self.root / "registry"), "CNEI_REGISTRY_NATS_URL": self.nats_url,
        }, self.registry_port)

    def start_edge(self) -> None:
        port = infra.free_port()
        self.spawn("edge", "services.edge_runtime", {
            "CNEI_RUNTIME_NODE_ID": "edge-outage", "CNEI_RUNTIME_TIER": "edge", "CNEI_RUNTIME_PORT": str(port),
            "CNEI_RUNTIME_FAST_PORT": str(infra.free_port()), "CNEI_RUNTIME_METRICS_PORT": "0",
            "CNEI_RUNTIME_REGISTRY_TARGET": self.registry, "CNEI_RUNTIME_REDIS_URL": self.redis_url,
            "CNEI_RUNTIME_NATS_URL": self.nats_url, "CNEI_RUNTIME_CACHE_DIR": str(self.root / "cache"),
            "CNEI_RUNTIME_PRELOAD": "digits",
        }, port)

    def start_coordinator(self, door: str) -> None:
        grpc_port, metrics_port, http_port = infra.free_port(), infra.free_port(), infra.free_port()
        self.spawn(f"coordinator-{door}", "services.coordinator", {
            "CNEI_COORDINATOR_GRPC_PORT": str(grpc_port), "CNEI_COORDINATOR_HTTP_PORT": str(http_port),
            "CNEI_COORDINATOR_METRICS_PORT": str(metrics_port), "CNEI_COORDINATOR_FRONT_DOOR": door,
            "CNEI_COORDINATOR_REGISTRY_TARGET": self.registry, "CNEI_COORDINATOR_REDIS_URL": self.redis_url,
            "CNEI_COORDINATOR_NATS_URL": self.nats_url, "CNEI_COORDINATOR_RESOLVE_TTL_S": str(RESOLVE_TTL_S),
            "CNEI_COORDINATOR_REGISTRY_TIMEOUT_S": str(REGISTRY_TIMEOUT_S),
        }, grpc_port)
        address = f"127.0.0.1:{grpc_port}"
        infra.wait_until(lambda: server_ready(address), 30, f"coordinator (door {door}) ready")
        self.coordinators[door] = (address, metrics_port, http_port, self.root / f"coordinator-{door}.log")

    def stop(self, name: str) -> None:
        infra.stop(self.procs.pop(name))

    @contextlib.contextmanager
    def registry_down(self, how: str):
        """The registry killed (-9) or frozen (SIGSTOP) for the block; running again after it."""
        proc = self.procs["registry"]
        if how == "killed":
            proc.kill()
            proc.wait()
        else:
            proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(3 * RESOLVE_TTL_S)  # every answer the coordinators hold is stale by now
            yield
        finally:
            if how == "killed":
                self.procs.pop("registry")
                self.start_registry()
            else:
                proc.send_signal(signal.SIGCONT)


def push(site: Site, digits_models, name: str, *versions: str) -> None:
    fp32 = next(v for v in digits_models if v.precision == "FP32")

    async def go():
        client = RegistryClient(site.registry)
        try:
            for version in versions:
                await client.push_file(fp32.path, name, version, "FP32", fp32.metadata)
        finally:
            await client.close()
    asyncio.run(go())


def infer(address: str, model: str = "digits", version: str = ""):
    """One digits request (a client deadline of 10 s): its reply."""
    tensor = triton.InferInput("input", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
    with triton.InferenceServerClient(address) as client:
        return client.infer(model, [tensor], model_version=version, client_timeout=10)


def infer_for(address: str, seconds: float, model: str = "digits") -> list[tuple[float, object]]:
    """Requests one after another for `seconds`: (seconds each took, its reply or its error)."""
    results, until = [], time.monotonic() + seconds
    while time.monotonic() < until:
        start = time.monotonic()
        try:
            outcome = infer(address, model)
        except InferenceServerException as exc:
            outcome = exc
        results.append((time.monotonic() - start, outcome))
    return results


def metric(metrics_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not on the coordinator's metrics")


def status(http_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/status", timeout=10) as reply:
        return json.loads(reply.read())


@pytest.fixture(scope="module")
def site(tmp_path_factory, digits_models):
    s = Site(tmp_path_factory.mktemp("registry-outage"))
    s.procs["nats"] = infra.start_nats(int(s.nats_url.rsplit(":", 1)[1]), s.root / "nats")
    s.procs["redis"] = infra.start_redis(int(s.redis_url.rsplit(":", 1)[1].split("/")[0]), s.root / "redis")
    try:
        s.start_registry()
        push(s, digits_models, "digits", "1")
        push(s, digits_models, "outage-events", "1", "2")
        s.start_edge()
        for door in DOORS:
            s.start_coordinator(door)
            address = s.coordinators[door][0]
            infra.wait_until(lambda: _answers(address), 30, f"digits served through the coordinator (door {door})")
        yield s
    finally:
        for name in list(s.procs)[::-1]:
            s.procs[name].send_signal(signal.SIGCONT)
            s.stop(name)


def _answers(address: str) -> bool:
    try:
        infer(address)
    except InferenceServerException:
        return False
    return True


@pytest.mark.parametrize("door", DOORS)
def test_a_known_model_is_served_while_the_registry_is_killed(site, door):
    address = site.coordinators[door][0]
    assert not door == "on" or answered_by_door(infer(address))
    with site.registry_down("killed"):
        results = infer_for(address, 8 * RESOLVE_TTL_S)
    failures = [str(outcome) for _, outcome in results if isinstance(outcome, Exception)]
    assert results and not failures, failures[:3]
    if door == "on":  # the door's routes are built from the last known answers too
        assert all(answered_by_door(reply) for _, reply in results[1:])


@pytest.mark.parametrize("door", DOORS)
def test_a_known_model_is_served_promptly_while_the_registry_is_frozen(site, door):
    address = site.coordinators[door][0]
    infer(address)
    with site.registry_down("frozen"):
        results = infer_for(address, 8 * RESOLVE_TTL_S)
    failures = [str(outcome) for _, outcome in results if isinstance(outcome, Exception)]
    assert results and not failures, failures[:3]
    took = sorted(seconds for seconds, _ in results)
    assert took[-1] < REGISTRY_TIMEOUT_S + 1.0, took  # no request waits out the registry's silence
    assert len(results) >= 5 and took[-2] < 0.5 * REGISTRY_TIMEOUT_S, took


@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_model_never_seen_fails_unavailable_naming_the_registry(site, how):
    address = site.coordinators[DOORS[-1]][0]
    with site.registry_down(how):
        start = time.monotonic()
        with pytest.raises(InferenceServerException) as refused:
            infer(address, "never-seen")
        took = time.monotonic() - start
        assert _answers(address)  # the known model still is served
    assert refused.value.status() == "StatusCode.UNAVAILABLE", refused.value
    assert f"registry {site.registry}" in refused.value.message(), refused.value
    assert took < REGISTRY_TIMEOUT_S + 1.5


def test_a_deletion_announced_while_the_registry_is_away_still_applies(site):
    address = site.coordinators[DOORS[0]][0]
    assert infer(address, "outage-events", "1").get_response().model_version == "1"
    assert infer(address, "outage-events", "2").get_response().model_version == "2"
    assert infer(address, "outage-events").get_response().model_version == "2"

    async def announce_deletion():
        bus = EventBus(site.nats_url, "registry")
        await bus.start()
        try:
            await bus.publish(events.MODEL_DELETED, {"name": "outage-events", "version": "2", "precisions": ["FP32"]})
        finally:
            await bus.close()

    with site.registry_down("killed"):
        asyncio.run(announce_deletion())
        infra.wait_until(lambda: not _answers_version(address, "2"), 5, "version 2 refused once deleted")
        with pytest.raises(InferenceServerException) as refused:
            infer(address, "outage-events", "2")
        assert infer(address, "outage-events", "1").get_response().model_version == "1"
        assert infer(address, "outage-events").get_response().model_version == "1"
    assert refused.value.status() == "StatusCode.NOT_FOUND", refused.value


def _answers_version(address: str, version: str) -> bool:
    try:
        infer(address, "outage-events", version)
    except InferenceServerException:
        return False
    return True


def test_the_outage_is_logged_once_and_shown_on_metrics_and_the_status_page(site):
    address, metrics_port, http_port, log_file = site.coordinators[DOORS[0]]
    infra.wait_until(lambda: _answers(address) and status(http_port)["registry"]["reachable"], 30,
                     "the registry reachable after the tests before")
    logged = f"registry {site.registry} unreachable"
    logged_before = log_file.read_text().count(logged)
    with site.registry_down("killed"):
        infer_for(address, 8 * RESOLVE_TTL_S)
        assert metric(metrics_port, "cnei_coordinator_registry_unreachable_seconds") > 0
        shown = status(http_port)["registry"]
        assert shown["reachable"] is False and site.registry in shown["error"], shown
    assert log_file.read_text().count(logged) - logged_before == 1
    infra.wait_until(lambda: _answers(address) and metric(metrics_port, "cnei_coordinator_registry_unreachable_seconds") == 0,
                     30, "the registry reachable again")
    assert status(http_port)["registry"]["reachable"] is True
