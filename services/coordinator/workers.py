"""Several coordinator processes on one port: a supervisor that starts, watches and stops them.

Each worker is a whole coordinator (own event loop, batchers and node view) bound to the same
gRPC port with SO_REUSEPORT, so the kernel spreads client connections across them and the
coordinator uses more than one core. Worker 0 also serves REST and the status page; the
supervisor serves /metrics summed over every worker (prometheus_client's multiprocess mode)."""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from services.common import triton_metrics
from services.common.stats import merge
from services.coordinator.settings import PREFIX, CoordinatorSettings
from services.coordinator.stats_share import read_books

log = logging.getLogger(__name__)
RESTART_DELAY_S = 1.0
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def worker_count(setting: int, cpus: int | None = None) -> int:
    """`workers` as configured; 0 means one per CPU."""
    return setting if setting > 0 else max(1, cpus or os.cpu_count() or 1)


def worker_env(base: dict[str, str], index: int, metrics_dir: str, outbox_path: str) -> dict[str, str]:
    """The environment of worker `index`: one process, its own outbox, metrics to the shared dir."""
    env = {**base, f"{PREFIX}WORKERS": "1", f"{PREFIX}WORKER_INDEX": str(index),
           f"{PREFIX}SUPERVISOR_PID": str(os.getpid()),
           f"{PREFIX}METRICS_PORT": "0", f"{PREFIX}SHARED_DIR": metrics_dir, MULTIPROC_ENV: metrics_dir}
    if outbox_path:
        env[f"{PREFIX}OUTBOX_PATH"] = f"{outbox_path}.{index}"
    return env


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen


class Supervisor:
    """Starts `count` workers, restarts any that die, stops them all on request."""

    def __init__(self, settings: CoordinatorSettings, count: int, base_env: dict[str, str]):
        self.settings = settings
        self.count = count
        self.base_env = base_env
        self.metrics_dir = tempfile.mkdtemp(prefix="cnei-coordinator-metrics-")
        self.workers: dict[int, Worker] = {}

    def _spawn(self, index: int) -> subprocess.Popen:
        env = worker_env(self.base_env, index, self.metrics_dir, self.settings.outbox_path)
        return subprocess.Popen([sys.executable, "-m", "services.coordinator"], env=env)

    def start(self) -> None:
        for index in range(self.count):
            self.workers[index] = Worker(index, self._spawn(index))
        log.info("coordinator supervisor started %d workers on gRPC port %d", self.count,
                 self.settings.grpc_port)

    def serve_metrics(self) -> None:
        """/metrics on the configured port, summing every worker's values (404 at other paths)."""
        if not self.settings.metrics_port:
            return
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        from services.common.metrics_http import start_metrics_server

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.metrics_dir)
        triton_metrics.register(lambda: merge(read_books(self.metrics_dir)), registry)
        start_metrics_server(self.settings.host, self.settings.metrics_port, registry)

    async def watch(self, stop: asyncio.Event, poll_s: float = 0.5) -> None:
        """Restart a worker that exits on its own until `stop` is set."""
        while not stop.is_set():
            for worker in list(self.workers.values()):
                code = worker.proc.poll()
                if code is not None and not stop.is_set():
                    self._forget(worker.proc.pid)
                    log.error("coordinator worker %d (pid %d) exited with %s; restarting",
                              worker.index, worker.proc.pid, code)
                    await asyncio.sleep(RESTART_DELAY_S)
                    worker.proc = self._spawn(worker.index)
            try:
                await asyncio.wait_for(stop.wait(), poll_s)
            except asyncio.TimeoutError:
                pass

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM every worker (each drains its in-flight requests), SIGKILL after `grace_s`."""
        for worker in self.workers.values():
            if worker.proc.poll() is None:
                worker.proc.terminate()
        deadline = time.monotonic() + grace_s
        for worker in self.workers.values():
            try:
                worker.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("coordinator worker %d did not stop in %.0fs; killing", worker.index, grace_s)
                worker.proc.kill()
                worker.proc.wait()
            self._forget(worker.proc.pid)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _forget(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self.metrics_dir)


async def supervise(settings: CoordinatorSettings, count: int) -> None:
    from services.common import lifecycle

    stop = lifecycle.stop_event()
    supervisor = Supervisor(settings, count, dict(os.environ))
    supervisor.start()
    try:
        supervisor.serve_metrics()
        await supervisor.watch(stop)
    finally:
        log.info("coordinator supervisor stopping %d workers", count)
        await asyncio.get_running_loop().run_in_executor(None, supervisor.stop)
