"""What a runtime process refreshes when the registry announces a version or a deployment (and
on reconnect): the versions the model's deployment serves, not whatever version is newest."""
from __future__ import annotations

import uuid

import pytest

from services.cli import infra
from services.common.deployment import DeploymentSpec, RolloutSpec
from tests.edge_runtime.processes import call_registry, infer, loaded, start_runtime
from tests.retrained import write_versions


@pytest.fixture
def two_files(tmp_path):
    return write_versions(tmp_path)


def test_a_version_the_deployment_does_not_serve_is_neither_pulled_nor_loaded_and_its_promotion_loads_it(
        registry, nats_server, redis_server, tmp_path, two_files):
    uid = uuid.uuid4().hex[:8]
    pinned, newest = f"pinned-{uid}", f"newest-{uid}"
    v1_file, v2_file = two_files
    size = max(v1_file.stat().st_size, v2_file.stat().st_size)
    for model in (pinned, newest):
        call_registry(registry, "push_file", v1_file, model, "1", "FP32")
    call_registry(registry, "put_deployment", DeploymentSpec(model=pinned, rollout=RolloutSpec(stable="1")))
    cache = tmp_path / "cache"
    proc, address = start_runtime(registry, nats_server, redis_server, cache,
                                  CNEI_RUNTIME_CACHE_MAX_BYTES=str(size * 7 // 2))  # three fit in memory
    try:
        assert infer(address, pinned, "1") == "1" and infer(address, newest) == "1"
        call_registry(registry, "push_file", v2_file, pinned, "2", "FP32")  # not released: stable stays 1
        call_registry(registry, "push_file", v2_file, newest, "2", "FP32")  # no deployment: the latest serves
        # a subject's events are handled in order: once newest v2 is loaded, pinned v2's event was handled
        infra.wait_until(lambda: f"{newest}:2:FP32" in loaded(address), 20, "the newest version loaded")
        held = loaded(address)  # (a fourth model would evict the least recently used: pinned v1)
        assert f"{pinned}:1:FP32" in held and f"{pinned}:2:FP32" not in held, held
        assert [p.name for p in cache.glob(f"{pinned}+2+*.json")] == []  # never pulled either

        call_registry(registry, "put_deployment", DeploymentSpec(model=pinned, rollout=RolloutSpec(stable="2")))
        infra.wait_until(lambda: f"{pinned}:2:FP32" in loaded(address), 20, "the promoted version loaded")
    finally:
        infra.stop(proc)


def test_a_direct_request_naming_no_version_gets_the_version_the_deployment_pins(
        registry, nats_server, redis_server, tmp_path, two_files):
    """A client of the runtime itself that names no version is served the deployment's stable
    version, as through the coordinator, not a newer one pushed but not released; once the
    deployment moves to it, the new one."""
    model = f"direct-{uuid.uuid4().hex[:8]}"
    v1_file, v2_file = two_files
    call_registry(registry, "push_file", v1_file, model, "1", "FP32")
    call_registry(registry, "push_file", v2_file, model, "2", "FP32")
    call_registry(registry, "put_deployment", DeploymentSpec(model=model, rollout=RolloutSpec(stable="1")))
    proc, address = start_runtime(registry, nats_server, redis_server, tmp_path / "cache")
    try:
        assert infer(address, model) == "1"
        assert infer(address, model, "2") == "2"  # named, it is served
        call_registry(registry, "put_deployment", DeploymentSpec(model=model, rollout=RolloutSpec(stable="2")))
        infra.wait_until(lambda: infer(address, model) == "2", 20, "the promoted version served")
    finally:
        infra.stop(proc)
