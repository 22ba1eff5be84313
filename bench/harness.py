"""What every bench command line shares: timestamped progress lines, SIGTERM as an interrupt,
where built models are kept, and the header of a results file."""
from __future__ import annotations

import os
import platform
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / ".bench" / "models"  # built once, reused by every bench
SETTLE_S = 2.5  # the coordinator caches a deployment for 2 s (and drops it on the NATS event)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """SIGTERM ends a bench like Ctrl-C: its `finally` blocks stop what it started."""
    signal.signal(signal.SIGTERM, _interrupt)


def run_meta(quick: bool, started: float, load_at_start: float) -> dict:
    """When, at which commit, how long, in which mode and on what machine a bench ran."""
    commit = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "duration_s": round(time.time() - started), "git": commit, "mode": "quick" if quick else "full",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, 1-min load average {load_at_start:.2f} "
                   f"at start, {os.getloadavg()[0]:.2f} at end",
    }
