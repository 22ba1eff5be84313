"""ONNX Runtime sessions: provider choice (CUDA when present, else CPU) and batched runs."""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from services.common.errors import CneiError, ErrorCode, TensorError, error_for
from services.common.model_spec import ModelVariant, sample_inputs

log = logging.getLogger(__name__)

# Automatic intra-op threads (intra_op_threads = 0): a session gets every core of the process (up
# to MAX_AUTO_THREADS) only when that runs a TUNE_BATCH-row call at least MIN_SPEEDUP times faster
# than one thread, and one thread takes at least MIN_SPLIT_MS (waking sleeping threads costs tens
# of µs: small models stay on one thread, and their latency with it).
TUNE_BATCH = 16
MAX_AUTO_THREADS = 8
MIN_SPEEDUP = 1.25
MIN_SPLIT_MS = 0.5

# What ONNX Runtime's failure of a run says, as an OIP code. Its InvalidArgument is about the
# inputs: their types or shapes, or values a kernel refuses (a Gather index out of range). Every
# other failure (Fail, RuntimeException, EPFail, NotImplemented, InvalidGraph, ...) is the model's
# or the runtime's own: INTERNAL, as Triton's onnxruntime backend answers every ORT failure
# ("onnx runtime error N: ..."). The exception classes ORT raises for its status codes:
ORT_FAILURES: tuple[type[Exception], ...] = tuple(
    c for c in vars(ort_state).values() if isinstance(c, type) and issubclass(c, Exception))
ORT_CODES: dict[type[Exception], ErrorCode] = {ort_state.InvalidArgument: ErrorCode.INVALID_ARGUMENT}
_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")


def choose_providers(use_cuda: bool, available: list[str] | None = None) -> list[str]:
    """CUDA first when asked for and present, CPU always as the fallback."""
    available = ort.get_available_providers() if available is None else available
    if use_cuda and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtModel:
    """One loaded ONNX model; `run` is blocking and thread-safe (call it off the event loop)."""

    def __init__(self, path: Path, use_cuda: bool = True, intra_op_threads: int = 1):
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        # Intra-op threads sleep between calls instead of spinning: a server shares its cores
        # with its own event loop (and here with the front door and the client).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=choose_providers(use_cuda)
            )
        except Exception as exc:  # noqa: BLE001 - CUDA set-up failures fall back to CPU
            if not use_cuda:
                raise
            log.warning("CUDA session for %s failed (%s); falling back to CPU", path, exc)
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.provider = self.session.get_providers()[0]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.intra_op_threads = intra_op_threads

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model: BYTES inputs go in as text, string outputs come back as UTF-8 bytes."""
        names = outputs or self.output_names
        feed = {name: ort_input(array, name) for name, array in inputs.items()}
        try:
            results = self.session.run(names, feed)
        except ORT_FAILURES as exc:
            raise run_error(exc) from None
        return {name: oip_output(array) for name, array in zip(names, results)}


def run_error(exc: Exception) -> CneiError:
    """ONNX Runtime's failure of a run as the error a client hears (`ORT_CODES`, else INTERNAL),
    with ORT's message; a failure that is not about the inputs is logged."""
    code = ORT_CODES.get(type(exc), ErrorCode.INTERNAL)
    message = f"onnx runtime: {_ORT_PREFIX.sub('', str(exc)).strip()}"
    if code is ErrorCode.INTERNAL:
        log.warning("%s: %s", type(exc).__name__, message)
    return error_for(code, message)


def ort_input(array: np.ndarray, name: str) -> np.ndarray:
    """`array` as ONNX Runtime takes it: a BYTES tensor (an object array of `bytes`, as the codec
    decodes it) becomes an object array of `str` (ORT would turn each `bytes` into its repr,
    b"a" into "b'a'"; ORT's string tensors are UTF-8, so other bytes are refused, naming the
    tensor). Other arrays pass as they are."""
    if array.dtype.kind not in ("O", "S"):
        return array
    text = np.empty(array.shape, dtype=object)
    flat = text.reshape(-1)
    for i, item in enumerate(array.reshape(-1)):
        if isinstance(item, (bytes, np.bytes_)):
            try:
                item = bytes(item).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise TensorError(name, f"element {i} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                                        f"the model's string tensors take UTF-8 only") from None
        flat[i] = item if isinstance(item, str) else str(item)
    return text


def oip_output(array: np.ndarray) -> np.ndarray:
    """An ORT output as the OIP codec sends it: a string tensor (object array of `str`) becomes
    an object array of UTF-8 `bytes`; other arrays pass as they are."""
    if array.dtype.kind != "O":
        return array
    data = np.empty(array.shape, dtype=object)
    data.reshape(-1)[:] = [item.encode("utf-8") if isinstance(item, str) else item for item in array.reshape(-1)]
    return data


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_threads(one_thread_ms: float, many_threads_ms: float, many: int) -> int:
    """The intra-op thread count to keep: `many` when it pays (see MIN_SPEEDUP, MIN_SPLIT_MS)."""
    if many <= 1 or one_thread_ms < MIN_SPLIT_MS:
        return 1
    return many if one_thread_ms >= MIN_SPEEDUP * many_threads_ms else 1


def tuned_model(path: Path, use_cuda: bool, inputs: dict[str, np.ndarray], cores: int, label: str = "") -> OrtModel:
    """A session with the intra-op threads that run `inputs` fastest here: one thread, or
    `cores` (capped at MAX_AUTO_THREADS) when `auto_threads` says so. Sessions on CUDA, and
    models whose sample inputs do not run, keep one CPU thread (blocking). `label` names the
    model in the log (default: the file's name)."""
    label = label or path.name
    single = OrtModel(path, use_cuda, 1)
    many = min(cores, MAX_AUTO_THREADS)
    if many <= 1 or single.provider != "CPUExecutionProvider":
        return single
    try:
        one_ms = measure_latency_ms(single, inputs)
        if one_ms < MIN_SPLIT_MS:
            return single
        multi = OrtModel(path, False, many)
        many_ms = measure_latency_ms(multi, inputs)
    except Exception as exc:  # noqa: BLE001 - tuning is advisory; the model serves either way
        log.warning("could not time %s with several threads (%s); it keeps one", label, exc)
        return single
    chosen = auto_threads(one_ms, many_ms, many)
    log.info("%s: a %d-row call takes %.2f ms on 1 thread, %.2f ms on %d: keeping %d", label,
             next(iter(inputs.values())).shape[0] if inputs else 0, one_ms, many_ms, many, chosen)
    return multi if chosen == many else single


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc), 0 where unknown."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def measure_latency_ms(model: OrtModel, inputs: dict[str, np.ndarray], warmup: int = 3, runs: int = 15) -> float:
    """Median wall time of one run on `inputs` after warm-up (blocking)."""
    for _ in range(warmup):
        model.run(inputs)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model.run(inputs)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def measure_variant(model: OrtModel, variant: ModelVariant, rss_before: int) -> tuple[float, int]:
    """The variant's session timed at batch 1 on zero-filled inputs (`measure_latency_ms`), and
    its memory: what this process grew by since `rss_before` (read before the session was
    opened), at least the artifact's size (blocking): (latency in ms, memory in bytes)."""
    latency = measure_latency_ms(model, sample_inputs(variant))
    return latency, max(rss_bytes() - rss_before, variant.size_bytes)
