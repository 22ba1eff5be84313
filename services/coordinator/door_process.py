"""The compiled front door as a child process of the coordinator: started in front of the
coordinator's internal gRPC port, restarted if it dies, stopped first on shutdown (it hands
what it holds to the coordinator, which is still serving)."""
from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import threading
from pathlib import Path
from typing import IO

from services.common import lifecycle
from services.common.errors import FailedPrecondition
from services.common.restricted import Key
from services.common.tls import ClientTls, ServerTls

log = logging.getLogger(__name__)
door_log = logging.getLogger("services.coordinator.frontdoor")  # the door's own lines, read from its stderr
BUILT = Path(__file__).resolve().parent / "frontdoor" / "build" / "cnei-frontdoor"
MODES = ("auto", "on", "off")
RESTART_DELAY_S = 1.0


def door_binary(mode: str, configured: str = "") -> Path | None:
    """The front door to run for `mode`: None for off, or for auto when it is not built."""
    if mode not in MODES:
        raise FailedPrecondition(f"front_door must be one of {list(MODES)}, got {mode!r}")
    if mode == "off":
        return None
    path = Path(configured) if configured else BUILT
    if path.is_file():
        return path
    if mode == "on":
        raise FailedPrecondition(f"front door binary {path} not found: build it with `make frontdoor`")
    log.info("front door not built (%s): the coordinator serves gRPC itself", path)
    return None


# gRPC's own lines start with their severity ("E1127 10:28:00.1 ...", "W0000 00:00:...")
GRPC_SEVERITY = re.compile(r"^([IWEF])\d{4} ")
TROUBLE_WORDS = ("fail", "error", "cannot", "dropped", "do not load", "anyway")
READER_JOIN_S = 5.0


def door_line_level(line: str) -> int:
    """The level one of the door's stderr lines is logged at: WARNING when it tells of a failure
    (or gRPC marks it W, E or F), else INFO."""
    severity = GRPC_SEVERITY.match(line)
    if severity:
        return logging.INFO if severity.group(1) == "I" else logging.WARNING
    lowered = line.lower()
    return logging.WARNING if any(word in lowered for word in TROUBLE_WORDS) else logging.INFO


def log_door_lines(stream: IO[bytes]) -> None:
    """Log each line of the door's stderr until it closes (the door exited): the coordinator's
    log stays JSON lines. Runs in a thread of its own, so the door never waits on a full pipe."""
    with stream:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            if line:
                door_log.log(door_line_level(line), "%s", line)


RESTRICT_ENV = "CNEI_FRONTDOOR_RESTRICT_INFERENCE"
NODE_HEADERS_ENV = "CNEI_FRONTDOOR_NODE_HEADERS"  # KEY=VALUE;...: sent in the fast lane's hello

class DoorProcess:
    def __init__(self, binary: Path, listen: str, backend: str, report_interval_ms: int, shm_dir: str = "",
                 restrict_inference: Key | None = None, response_cache_bytes: int = 0, tls: ServerTls | None = None,
                 routes_generation: Path | None = None, node_headers: list[tuple[str, str]] | tuple = (),
                 node_tls: ClientTls | None = None):
        """`shm_dir`: where the coordinator keeps system shared memory registrations, which the door
        reads to serve requests whose tensors are in the client's shared memory itself.
        `restrict_inference`: the header and value inference requests need (restricted APIs).
        `tls`: the public port's certificate files (None: plaintext). `routes_generation`: the file
        the coordinator bumps when it drops routes (the door then lists the routes it holds).
        `node_headers`: the keys of runtimes whose inference API is restricted (fast lane hello).
        `node_tls`: the runtimes' fast lanes serve TLS: the CA to trust (and a client certificate)."""
        self.command = [str(binary), "--listen", listen, "--backend", backend,
                        "--report-interval-ms", str(report_interval_ms), "--parent-pid", str(os.getpid())]
        if shm_dir:
            self.command += ["--shm-dir", shm_dir]
        if response_cache_bytes > 0:  # answers of deployments with response_cache: true
            self.command += ["--response-cache-bytes", str(response_cache_bytes)]
        if routes_generation is not None:
            self.command += ["--routes-generation", str(routes_generation)]
        if tls is not None:  # file paths, not their contents, on the command line
            self.command += ["--tls-cert", tls.cert_file, "--tls-key", tls.key_file]
            if tls.mutual:
                self.command += ["--tls-client-ca", tls.client_ca_file]
        if node_tls is not None:
            self.command += ["--node-tls-ca", node_tls.ca_file]
            if node_tls.server_name:
                self.command += ["--node-tls-server-name", node_tls.server_name]
            if node_tls.cert_file:
                self.command += ["--node-tls-cert", node_tls.cert_file, "--node-tls-key", node_tls.key_file]
        self.env = {k: v for k, v in os.environ.items() if k not in (RESTRICT_ENV, NODE_HEADERS_ENV)}
        if restrict_inference is not None:  # in the environment: the command line is anybody's to read
            self.env[RESTRICT_ENV] = f"{restrict_inference.header}={restrict_inference.value}"
        if node_headers:
            self.env[NODE_HEADERS_ENV] = ";".join(f"{k}={v}" for k, v in node_headers)
        self.proc: subprocess.Popen | None = None
        self.readers: list[threading.Thread] = []  # one per door started, until its stderr closes

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command, env=self.env, stderr=subprocess.PIPE)
        reader = threading.Thread(target=log_door_lines, args=(self.proc.stderr,), daemon=True,
                                  name=f"frontdoor-stderr-{self.proc.pid}")
        reader.start()
        self.readers = [r for r in self.readers if r.is_alive()] + [reader]
        log.info("front door (pid %d) on %s in front of %s", self.proc.pid, self.command[2], self.command[4])

    async def watch(self, stop: asyncio.Event, poll_s: float = 0.2) -> None:
        """Restart the door when it exits on its own, until `stop` is set."""
        while not stop.is_set():
            code = self.proc.poll() if self.proc else None
            if code is not None:
                log.error("front door (pid %d) exited with %s; restarting", self.proc.pid, code)
                await asyncio.sleep(RESTART_DELAY_S)
                if stop.is_set():
                    return
                self.start()
            try:
                await asyncio.wait_for(stop.wait(), poll_s)
            except asyncio.TimeoutError:
                pass

    async def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM (the door finishes or hands over what it holds), SIGKILL after `grace_s`; then
        the door's last lines are logged."""
        if self.proc is not None:
            await asyncio.get_running_loop().run_in_executor(None, lifecycle.stop_process, self.proc, grace_s)
        await asyncio.get_running_loop().run_in_executor(None, self.join_readers)

    def join_readers(self, timeout_s: float = READER_JOIN_S) -> None:
        """Wait for the readers of doors that exited to log their last lines."""
        for reader in self.readers:
            reader.join(timeout_s)
