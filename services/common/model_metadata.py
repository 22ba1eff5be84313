"""The model metadata keys the services interpret, each with its parser (pure): the registry
refuses a push whose value does not parse, and readers take a stored value that does not (pushed
before the check) as absent, logged once."""
from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Callable, Mapping

from services.common.errors import AlreadyExists, InvalidArgument

log = logging.getLogger(__name__)

MAX_BATCH_SIZE = "max_batch_size"  # rows a batching model takes at most (0: it does not batch)
ACCURACY = "accuracy"  # top-1 accuracy, a fraction from 0 to 1 (precision selection's accuracy_floor)
LABELS = "labels"  # class labels, a JSON list of strings (the classification extension)
LATENCY_PREFIX = "latency_ms."  # + node class: measured batch-1 latency in ms (RecordMeasurement)
MEMORY_PREFIX = "memory_bytes."  # + node class: measured memory in bytes (RecordMeasurement)
INT32_MAX = 2**31 - 1  # ModelConfig.max_batch_size is an int32
_DIGITS = re.compile(r"^[0-9]+$")


def _whole(text: str, most: int) -> int:
    if not _DIGITS.match(text) or int(text) > most:
        raise ValueError(f"must be a whole number from 0 to {most}")
    return int(text)


def _finite(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return number


def batch_size(text: str) -> int:
    return _whole(text, INT32_MAX)


def fraction(text: str) -> float:
    number = _finite(text)
    if not 0.0 <= number <= 1.0:
        raise ValueError("must be a fraction from 0 to 1")
    return number


def milliseconds(text: str) -> float:
    number = _finite(text)
    if number < 0:
        raise ValueError("must not be negative")
    return number


def byte_count(text: str) -> int:
    return _whole(text, 2**63 - 1)


def label_list(text: str) -> list[str]:
    try:
        labels = json.loads(text)
    except ValueError:
        labels = None
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise ValueError('must be a JSON list of strings, such as ["cat", "dog"]')
    return labels


_KEYS: dict[str, Callable[[str], object]] = {MAX_BATCH_SIZE: batch_size, ACCURACY: fraction, LABELS: label_list}
_PREFIXES: dict[str, Callable[[str], object]] = {LATENCY_PREFIX: milliseconds, MEMORY_PREFIX: byte_count}
MEASURED = tuple(_PREFIXES)  # the keys runtimes record (RecordMeasurement), merged over pushed ones


def parser(key: str) -> Callable[[str], object] | None:
    """The parser of an interpreted key (None: a key no service reads as anything but text)."""
    if key in _KEYS:
        return _KEYS[key]
    prefix = next((p for p in _PREFIXES if key.startswith(p) and len(key) > len(p)), None)
    return _PREFIXES.get(prefix) if prefix else None


def check(metadata: Mapping[str, str]) -> None:
    """INVALID_ARGUMENT naming each interpreted key whose value does not parse, and why."""
    problems = []
    for key, value in sorted(metadata.items()):
        if (parse := parser(key)) is None:
            continue
        try:
            parse(value)
        except ValueError as exc:
            problems.append(f"{key}={value!r} {exc}")
    if problems:
        raise InvalidArgument(f"metadata {'; '.join(problems)}")


def value(metadata: Mapping[str, str], key: str, model: str = ""):
    """The parsed value of `key` (an interpreted one); None when absent or when it does not parse
    (stored before the registry checked it: logged once)."""
    text = metadata.get(key)
    if text is None:
        return None
    try:
        return parser(key)(text)
    except ValueError as exc:
        _warn_unreadable(model, key, text, str(exc))
        return None


@functools.lru_cache(maxsize=1024)
def _warn_unreadable(model: str, key: str, text: str, reason: str) -> None:
    log.warning("model %r metadata %s=%r %s: taken as absent (push a new version with a valid value)",
                model, key, text, reason)


def conflicts(stored: Mapping[str, str], shown: Mapping[str, str],
              pushed: Mapping[str, str]) -> dict[str, tuple[str | None, str]]:
    """The keys a push names whose values differ from those stored: {key: (stored, pushed)}. A
    value matches the one pushed before (`stored`) or the one shown now (`shown`: measurements
    merged over it), so a retry carrying either is no conflict."""
    return {key: (shown.get(key), text) for key, text in sorted(pushed.items())
            if text not in (stored.get(key), shown.get(key))}


class MetadataDiffers(AlreadyExists):
    """A push of a variant's stored bytes again whose metadata differs from that stored."""

    def __init__(self, model: str, version: str, precision: str, differing: Mapping[str, tuple[str | None, str]]):
        self.model, self.version, self.precision, self.differing = model, version, precision, dict(differing)
        said = "; ".join(f"{k}: stored {'none' if old is None else repr(old)}, pushed {new!r}"
                         for k, (old, new) in self.differing.items())
        super().__init__(f"model '{model}' version {version} precision {precision} is already stored with these "
                         f"bytes and other metadata ({said}): push it as a new version, or delete this one first")
