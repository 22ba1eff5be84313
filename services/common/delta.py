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
CHUNK = 1 << 22  # bytes best_split weighs at a time
MAX_BASES = 256  # artifacts a caller may name as held (FetchArtifactRequest.have)


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
    bytes equal the base byte they are XORed with. Works through the bytes in chunks (memory
    stays small whatever the size)."""
    size, shift = len(target), len(target) - len(base)
    if shift == 0 or size == 0:
        return size, shift
    # gain[i] = (byte i matches start-aligned) - (matches end-aligned): the best split k
    # maximises sum(gain[:k]) (every end-aligned match counts either way)
    overlap = min(size, len(base))
    start, stop = max(shift, 0), min(size, len(base) + shift)
    best, best_at, total = 0, 0, 0
    for lo in range(0, size, CHUNK):
        hi = min(size, lo + CHUNK)
        gain = np.zeros(hi - lo, np.int8)
        if min(hi, overlap) > lo:
            gain[:min(hi, overlap) - lo] += target[lo:min(hi, overlap)] == base[lo:min(hi, overlap)]
        end_lo, end_hi = max(lo, start), min(hi, stop)
        if end_hi > end_lo:
            gain[end_lo - lo:end_hi - lo] -= target[end_lo:end_hi] == base[end_lo - shift:end_hi - shift]
        running = np.cumsum(gain, dtype=np.int32)
        at = int(np.argmax(running))
        if total + int(running[at]) > best:
            best, best_at = total + int(running[at]), lo + at + 1
        total += int(running[-1])
    return best_at, shift


def _shuffle(data: np.ndarray) -> np.ndarray:
    """Byte 0 of every WORD-byte word, then byte 1, ... (the tail that fills no word stays last)."""
    whole = len(data) // WORD * WORD
    out = np.empty_like(data)
    out[:whole].reshape(WORD, -1)[...] = data[:whole].reshape(-1, WORD).T
    out[whole:] = data[whole:]
    return out


def _unshuffle(data: np.ndarray) -> np.ndarray:
    whole = len(data) // WORD * WORD
    out = np.empty_like(data)
    out[:whole].reshape(-1, WORD)[...] = data[:whole].reshape(WORD, -1).T
    out[whole:] = data[whole:]
    return out


def encode(base: bytes, target: bytes, level: int = LEVEL) -> bytes:
    """The delta that turns `base` into `target` (memory: about twice the target's size)."""
    b = np.frombuffer(base, np.uint8)
    t = np.frombuffer(target, np.uint8)
    split, shift = best_split(b, t)
    xored = _source(b, len(t), split, shift)
    np.bitwise_xor(t, xored, out=xored)
    return HEADER.pack(MAGIC, len(t), split, shift) + zlib.compress(_shuffle(xored), level)


def decode(base: bytes, delta: bytes) -> bytes:
    """`target` from `base` and the delta `encode` made of them; DeltaError when it cannot be."""
    if len(delta) < HEADER.size:
        raise DeltaError(f"delta of {len(delta)} bytes is shorter than its header")
    magic, size, split, shift = HEADER.unpack_from(delta)
    if magic != MAGIC:
        raise DeltaError("not a CNEI delta (bad magic)")
    if size - shift != len(base):
        raise DeltaError(f"delta for a base of {size - shift} bytes, this one has {len(base)}")
    if split > size:
        raise DeltaError(f"delta splits at byte {split} of {size}")
    inflate = zlib.decompressobj()
    try:
        xored = inflate.decompress(delta[HEADER.size:], size + 1)
    except zlib.error as exc:
        raise DeltaError(f"delta does not inflate: {exc}") from None
    if len(xored) != size or not inflate.eof or inflate.unused_data:
        raise DeltaError(f"delta inflates to {len(xored)} bytes, expected {size} and its end")
    target = _unshuffle(np.frombuffer(xored, np.uint8))
    del xored
    np.bitwise_xor(target, _source(np.frombuffer(base, np.uint8), size, split, shift), out=target)
    return target.tobytes()
