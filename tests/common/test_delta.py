"""Delta artifacts: exact round trips whatever the two files are, small deltas where a version
kept its layout, clear errors for a delta that does not fit the base."""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from services.common import delta

RNG = np.random.default_rng(7)


def weights(n: int) -> np.ndarray:
    return RNG.normal(0, 0.05, n).astype(np.float32)


def artifact(header: bytes, *tensors: np.ndarray) -> bytes:
    return header + b"".join(t.tobytes() for t in tensors)


@pytest.mark.parametrize("case", ["same-length", "longer-header", "shorter-header", "grown-tail", "empty-base",
                                  "empty-target", "unrelated", "identical"])
def test_decode_gives_back_exactly_the_target(case):
    w = weights(50_000)
    base = artifact(b"model v1 " * 3, w)
    moved = w.copy()
    moved[-500:] += 0.01
    target = {
        "same-length": artifact(b"model v2 " * 3, moved),
        "longer-header": artifact(b"model v2, fine-tuned " * 3, moved),
        "shorter-header": artifact(b"v2", moved),
        "grown-tail": artifact(b"model v1 " * 3, moved, weights(300)),
        "empty-base": artifact(b"model v2", moved),
        "empty-target": b"",
        "unrelated": RNG.integers(0, 256, 70_001, dtype=np.uint8).tobytes(),
        "identical": base,
    }[case]
    if case == "empty-base":
        base = b""
    assert delta.decode(base, delta.encode(base, target)) == target


@pytest.mark.parametrize("header", [b"model v2 " * 3, b"model v2 retrained on site-a " * 3],
                         ids=["same-layout", "header-grew"])
def test_a_version_whose_last_layer_alone_changed_costs_a_small_fraction_of_its_size(header):
    hidden, last = weights(400_000), weights(2_000)
    base = artifact(b"model v1 " * 3, hidden, last)
    target = artifact(header, hidden, last + 0.01)
    made = delta.encode(base, target)
    assert len(made) < 0.02 * len(target), f"{len(made)} of {len(target)} bytes"
    assert delta.decode(base, made) == target


def test_weights_that_all_moved_a_little_still_cost_less_than_the_compressed_artifact():
    w = weights(400_000)
    base, target = artifact(b"v1", w), artifact(b"v2", w * (1 + RNG.normal(0, 1e-3, w.size)).astype(np.float32))
    made = delta.encode(base, target)
    assert len(made) < 0.75 * len(zlib.compress(target, 6)), (len(made), len(zlib.compress(target, 6)))
    assert delta.decode(base, made) == target


def test_the_split_lines_up_the_bytes_after_a_header_that_grew():
    base = np.frombuffer(b"AB" + bytes(range(200)), np.uint8)
    target = np.frombuffer(b"ABCDE" + bytes(range(200)), np.uint8)
    split, shift = delta.best_split(base, target)
    assert shift == 3 and 2 <= split <= 5  # start-aligned over "AB", end-aligned from the header's end


@pytest.mark.parametrize(("mangle", "message"), [
    (lambda d: b"NOTDELTA" + d[8:], "bad magic"),
    (lambda d: d[:10], "shorter than its header"),
    (lambda d: d[:-20], "inflate"),
    (lambda d: d[:delta.HEADER.size] + b"garbage" * 5, "inflate"),
])
def test_a_delta_that_does_not_decode_says_why(mangle, message):
    base, target = artifact(b"v1", weights(1000)), artifact(b"v2", weights(1000))
    with pytest.raises(delta.DeltaError, match=message):
        delta.decode(base, mangle(delta.encode(base, target)))


def test_a_delta_for_another_base_is_refused():
    base, target = artifact(b"v1", weights(1000)), artifact(b"v2", weights(1000))
    with pytest.raises(delta.DeltaError, match="base of"):
        delta.decode(base + b"x", delta.encode(base, target))


def test_a_delta_whose_split_lies_past_its_end_is_refused():
    base, target = artifact(b"v1", weights(100)), artifact(b"v2", weights(100))
    made = delta.encode(base, target)
    magic, size, _, shift = delta.HEADER.unpack_from(made)
    forged = delta.HEADER.pack(magic, size, size + 1, shift) + made[delta.HEADER.size:]
    with pytest.raises(delta.DeltaError, match="splits at byte"):
        delta.decode(base, forged)
