"""Delta artifacts: a model version's bytes sent as their difference from an artifact the node
already holds (a version before it), so an edge node on a thin link pulls a retrained or
fine-tuned version without pulling every byte again.

A new version of the same network keeps the old one's layout: the same tensors at the same
offsets, give or take a header that grew or shrank. The delta XORs each target byte with the base
byte it lines up with — the base aligned at the start up to a split point and at the end after
it (where a length change happened) — and compresses the result: bytes that did not change become
zeros, weights that moved a little keep their sign, exponent and high mantissa bits (zeros in the
XOR again), and a tensor that did not move costs next to nothing. Decoding is exact whatever the
alignment; the caller still checks the result's sha256. The XORed bytes are shuffled before
compression (byte 0 of every 4-byte word, then byte 1, ...: Blosc's shuffle), which puts the
high bytes of float32 weights together: a version whose every weight moved by 0.1 % costs about
half its size, one whose last layer alone changed about 0.5 %.

Format: header `<8sQQq` (magic, target size, split, shift = target size - base size), then the
zlib stream of the shuffled XORed bytes.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

MAGIC = b"CNEIDLT1"
HEADER = struct.Struct("<8sQQq")
LEVEL = 6  # zlib level: a delta is made once per (base, target) and kept
WORD = 4  # shuffle unit: float32 weights


class DeltaError(ValueError):
    """A delta that does not decode against this base."""


def _source(base: np.ndarray, size: int, split: int, shift: int) -> np.ndarray:
    """The byte each target byte is XORed with: base[i] before `split`, base[i - shift] from it
    (0 where the base has no such byte)."""
    source = np.zeros(size, np.uint8)
    head = min(split, len(base), size)
    source[:head] = base[:head]
    start, stop = max(split, shift, 0), min(size, len(base) + shift)
    if stop > start:
        source[start:stop] = base[start - shift:stop - shift]
    return source


def best_split(base: np.ndarray, target: np.ndarray) -> tuple[int, int]:
    """(split, shift): where to change from start- to end-alignment so that the most target
    bytes equal the base byte they are XORed with."""
    size, shift = len(target), len(target) - len(base)
    if shift == 0:
        return size, 0
    at_start = np.zeros(size, bool)
    n = min(size, len(base))
    at_start[:n] = target[:n] == base[:n]
    at_end = np.zeros(size, bool)
    start, stop = max(shift, 0), min(size, len(base) + shift)
    if stop > start:
        at_end[start:stop] = target[start:stop] == base[start - shift:stop - shift]
    # score(k) = matches start-aligned before k + matches end-aligned from k, k in 0..size
    before = np.concatenate(([0], np.cumsum(at_start)))
    after = np.concatenate((np.cumsum(at_end[::-1])[::-1], [0]))
    return int(np.argmax(before + after)), shift


def _shuffle(data: np.ndarray) -> np.ndarray:
    whole = len(data) // WORD * WORD
    return np.concatenate((data[:whole].reshape(-1, WORD).T.ravel(), data[whole:]))


def _unshuffle(data: np.ndarray) -> np.ndarray:
    whole = len(data) // WORD * WORD
    return np.concatenate((data[:whole].reshape(WORD, -1).T.ravel(), data[whole:]))


def encode(base: bytes, target: bytes, level: int = LEVEL) -> bytes:
    """The delta that turns `base` into `target`."""
    b = np.frombuffer(base, np.uint8)
    t = np.frombuffer(target, np.uint8)
    split, shift = best_split(b, t)
    xored = np.bitwise_xor(t, _source(b, len(t), split, shift))
    return HEADER.pack(MAGIC, len(t), split, shift) + zlib.compress(_shuffle(xored).tobytes(), level)


def decode(base: bytes, delta: bytes) -> bytes:
    """`target` from `base` and the delta `encode` made of them; DeltaError when it cannot be."""
    if len(delta) < HEADER.size:
        raise DeltaError(f"delta of {len(delta)} bytes is shorter than its header")
    magic, size, split, shift = HEADER.unpack_from(delta)
    if magic != MAGIC:
        raise DeltaError("not a CNEI delta (bad magic)")
    if split > size or size - shift != len(base):
        raise DeltaError(f"delta for a base of {size - shift} bytes, this one has {len(base)}")
    inflate = zlib.decompressobj()
    try:
        xored = inflate.decompress(delta[HEADER.size:], size + 1)
    except zlib.error as exc:
        raise DeltaError(f"delta does not inflate: {exc}") from None
    if len(xored) != size or not inflate.eof:
        raise DeltaError(f"delta inflates to {len(xored)} bytes, expected {size}")
    source = _source(np.frombuffer(base, np.uint8), size, split, shift)
    return np.bitwise_xor(_unshuffle(np.frombuffer(xored, np.uint8)), source).tobytes()
