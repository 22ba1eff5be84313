"""Run Triton's perf_analyzer once per (target, model, concurrency) and read its CSV report."""
from __future__ import annotations

import csv
import io
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Every window counts as stable: the bench takes exactly three windows per point instead of
# retrying until a noisy shared machine happens to be quiet (perf_analyzer reports nothing then).
STABILITY_PERCENT = 1000
MAX_TRIALS = 6
WARMUP_REQUESTS = 100
# How perf_analyzer keeps `concurrency` requests open in closed-loop runs. `async`: one thread and
# gRPC's async API (the default here: ~120 µs of client CPU a request, against ~180 µs with `sync`,
# one blocking thread per open request; the client shares the cores with the servers it measures,
# so a cheaper client leaves more of them to every server alike). `sync`: perf_analyzer's default.
# `streaming`: every request on one ModelStreamInfer stream (gRPC only).
CLIENT_MODES = {"async": ["--async", "--max-threads", "1"], "sync": [], "streaming": ["--streaming"]}


@dataclass(frozen=True)
class Point:
    """One measured (model, precision, config, concurrency) point; `error` is set when it failed."""

    model: str
    precision: str
    config: str
    concurrency: int
    infer_per_s: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    error: str = ""
    # µs of CPU per request over the run, by process group ("client": perf_analyzer), where measured
    cpu_us: dict[str, float] = field(default_factory=dict)
    # rows per ONNX Runtime call on the runtimes over the run (the batch the model saw), where measured
    rows_per_execution: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def binary() -> str:
    """perf_analyzer next to this interpreter (the project virtualenv's bin/)."""
    return str(Path(sys.executable).parent / "perf_analyzer")


# A server on mutual TLS: (CA, client certificate, client key) PEM files.
ClientTls = tuple[str, str, str]


def tls_flags(tls: ClientTls | None) -> list[str]:
    """perf_analyzer's flags for a server on mutual TLS (none: plaintext)."""
    if tls is None:
        return []
    ca, cert, key = tls
    return ["--ssl-grpc-use-ssl", "true", "--ssl-grpc-root-certifications-file", ca,
            "--ssl-grpc-certificate-chain-file", cert, "--ssl-grpc-private-key-file", key]


def command(target: str, model: str, concurrency: int, interval_ms: int, csv_path: Path,
            parameters: dict[str, str] | None = None, poisson_rate: float = 0.0,
            client: str = "async", tls: ClientTls | None = None) -> list[str]:
    """Closed loop at `concurrency` (the client in CLIENT_MODES[client]), or (poisson_rate > 0)
    open-loop Poisson arrivals at that many requests per second, sent asynchronously so a slow
    answer never delays the next request; `tls`: the target serves mutual TLS."""
    load = (["--request-rate-range", f"{poisson_rate:g}", "--request-distribution", "poisson", "--async"]
            if poisson_rate > 0 else ["--concurrency-range", str(concurrency), *CLIENT_MODES[client]])
    args = [binary(), "-m", model, "-u", target, "-i", "grpc", "-b", "1", *load,
            "--measurement-interval", str(interval_ms),
            "-s", str(STABILITY_PERCENT), "-r", str(MAX_TRIALS),
            "--warmup-request-count", str(WARMUP_REQUESTS), "-f", str(csv_path), *tls_flags(tls)]
    for key, value in (parameters or {}).items():
        args += ["--request-parameter", f"{key}:{value}:string"]
    return args


def parse_csv(text: str) -> tuple[float, float, float]:
    """(infer/s, p50 µs, p99 µs) from the first data row of perf_analyzer's `-f` report."""
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows:
        raise ValueError("perf_analyzer wrote no measurement")
    row = rows[0]
    return float(row["Inferences/Second"]), float(row["p50 latency"]), float(row["p99 latency"])


def measure(target: str, model: str, precision: str, config: str, concurrency: int,
            interval_ms: int, parameters: dict[str, str] | None = None, poisson_rate: float = 0.0,
            client: str = "async", tls: ClientTls | None = None) -> Point:
    """One perf_analyzer run (see `command`); a failure becomes a Point with `error` so the bench
    goes on."""
    with tempfile.TemporaryDirectory(prefix="cnei-pa-") as tmp:
        csv_path = Path(tmp) / "report.csv"
        timeout = 30 + MAX_TRIALS * interval_ms / 1000 * 3
        try:
            done = subprocess.run(command(target, model, concurrency, interval_ms, csv_path, parameters,
                                          poisson_rate, client, tls),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Point(model, precision, config, concurrency, error=f"timed out after {timeout:.0f}s")
        if not csv_path.exists():
            tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
            return Point(model, precision, config, concurrency,
                         error=" / ".join(tail) or f"exit code {done.returncode}")
        infer_per_s, p50, p99 = parse_csv(csv_path.read_text())
    return Point(model, precision, config, concurrency, infer_per_s, p50, p99)
