"""`cnei up` as a terminal runs it: Ctrl-C (SIGINT to its whole process group) reaches only `cnei up`,
which stops the services before NATS and Redis; SIGKILL leaves no child behind (a next `cnei up`
starts); a stop signal during startup stops what was started at once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.cli import infra
from tests.e2e.processes import children


def _descendants(pid: int) -> list[int]:
    found = children(pid)
    return found + [d for child in found for d in _descendants(child)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _mesh_env(root: Path) -> dict[str, str]:
    """A private mesh on free ports (its own NATS and Redis, started by `cnei up`), without the demo."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNEI_", "OTEL_"))}
    runtime, runtime_http, runtime_metrics = infra.free_ports(3), infra.free_ports(3), infra.free_ports(3)
    ports = {name: str(infra.free_port()) for name in (
        "REGISTRY_PORT", "GRPC_PORT", "HTTP_PORT", "METRICS_PORT", "REGISTRY_METRICS_PORT", "TRAINER_PORT",
        "TRAINER_METRICS_PORT")}
    return {**env, **{f"CNEI_{k}": v for k, v in ports.items()}, "CNEI_DATA_DIR": str(root), "CNEI_DEMO": "false",
            "CNEI_NATS_URL": f"nats://127.0.0.1:{infra.free_port()}",
            "CNEI_REDIS_URL": f"redis://127.0.0.1:{infra.free_port()}/0",
            "CNEI_RUNTIME_BASE_PORT": str(runtime), "CNEI_RUNTIME_HTTP_BASE_PORT": str(runtime_http),
            "CNEI_RUNTIME_METRICS_BASE_PORT": str(runtime_metrics)}


class Up:
    """`cnei up` in its own session, as a shell starts a foreground job."""

    def __init__(self, root: Path, env: dict[str, str], run: int = 1):
        self.root, self.env, self.log = root, env, root.parent / f"{root.name}-up-{run}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.cli.main", "up"], env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text()

    def wait_up(self) -> list[int]:
        infra.wait_until(lambda: "mesh up" in self.output() or self.proc.poll() is not None, 120, "cnei up")
        assert self.proc.poll() is None, self.output()
        return _descendants(self.proc.pid)

    def close(self) -> None:
        pids = _descendants(self.proc.pid) if self.proc.poll() is None else []
        infra.stop(self.proc)
        for pid in pids:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def up(tmp_path):
    started = []

    def start(again: Up | None = None) -> Up:
        """A new `cnei up`, or one again with the ports and data directory of `again`."""
        root = again.root if again else tmp_path / "mesh"
        started.append(Up(root, again.env if again else _mesh_env(root), len(started) + 1))
        return started[-1]

    yield start
    for running in started:
        running.close()


def _wait_gone(pids: list[int], timeout: float = 30) -> None:
    infra.wait_until(lambda: not any(_alive(p) for p in pids), timeout,
                     f"children {[p for p in pids if _alive(p)]} to exit")


def test_ctrl_c_reaches_only_cnei_up_which_stops_the_services_before_nats_and_redis(up):
    mesh = up()
    kids = mesh.wait_up()
    assert kids and all(os.getpgid(pid) != mesh.proc.pid for pid in children(mesh.proc.pid))
    os.killpg(mesh.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does to the foreground job
    assert mesh.proc.wait(60) == 0, mesh.output()
    _wait_gone(kids)
    logs = {p.name: p.read_text() for p in (mesh.root / "logs").glob("*.log")}
    assert {"nats.log", "redis.log", "edge-a1.log"} <= set(logs)
    assert not [name for name, text in logs.items() if "could not publish" in text]


def test_children_of_a_killed_cnei_up_exit_and_the_next_cnei_up_starts(up):
    first = up()
    kids = first.wait_up()
    names = [Path(f"/proc/{pid}/cmdline").read_text() for pid in kids]
    assert any("nats-server" in n for n in names) and any("redis-server" in n for n in names)
    first.proc.kill()
    first.proc.wait(10)
    _wait_gone(kids)
    assert up(again=first).wait_up()


def test_a_stop_signal_during_startup_stops_what_was_started_and_says_interrupted(up):
    mesh = up()
    infra.wait_until(lambda: (mesh.root / "logs" / "registry.log").exists(), 60, "the first service to start")
    kids = _descendants(mesh.proc.pid)
    mesh.proc.send_signal(signal.SIGTERM)
    began = time.monotonic()
    assert mesh.proc.wait(30) == 130, mesh.output()
    assert time.monotonic() - began < 25 and "mesh up" not in mesh.output()
    assert "interrupted" in mesh.output()
    _wait_gone(kids)
