"""Model caches of a runtime: verified artifacts on disk, loaded sessions in memory (L1, LRU)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from collections import OrderedDict
from urllib.parse import quote
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from services.common.errors import FailedPrecondition
from services.common.model_spec import ModelVariant, TensorSpec

log = logging.getLogger(__name__)
TEMPORARY = re.compile(r"\.[0-9a-f]{32}\.tmp$")  # what `_atomic_write` writes before its rename
OLD_MANIFEST = re.compile(r"^[^+]*--[^+]*--[^+]*\.json$")  # name--version--precision.json: ambiguous names
HASH_CHUNK = 1 << 20
CACHE_EVENTS = Counter("cnei_model_cache_events_total", "L1 model cache events", ["event"])
_HITS = CACHE_EVENTS.labels("hit")  # every request looks up its model: bound once
CACHE_BYTES = Gauge("cnei_model_cache_bytes", "Bytes of models loaded in the L1 cache")


def variant_to_json(v: ModelVariant) -> str:
    return json.dumps(asdict(v), sort_keys=True)


def variant_from_json(text: str) -> ModelVariant:
    obj = json.loads(text)
    obj["inputs"] = [TensorSpec(s["name"], s["datatype"], tuple(s["shape"])) for s in obj["inputs"]]
    obj["outputs"] = [TensorSpec(s["name"], s["datatype"], tuple(s["shape"])) for s in obj["outputs"]]
    return ModelVariant(**obj)


class DiskCache:
    """Artifacts by sha256 plus the manifest of each cached variant (for offline resolution)."""

    def __init__(self, root: str | Path):
        """Opens (or makes) the cache at `root`, deleting what interrupted writes left there."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_temporaries()
        self._rename_old_manifests()

    def artifact_path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.onnx"

    def manifest_path(self, variant: ModelVariant) -> Path:
        """`name+version+precision.json`, each part percent-encoded (`+` included): one file per
        variant, whatever its name and version hold (`a--b` v1 and `a` v`b--1` used to share one)."""
        parts = (quote(part, safe="") for part in (variant.name, variant.version, variant.precision))
        return self.root / ("+".join(parts) + ".json")

    def has(self, variant: ModelVariant) -> bool:
        """The variant's bytes and its manifest are both here."""
        return self.artifact_path(variant.sha256).is_file() and self.manifest_path(variant).is_file()

    def intact(self, sha256: str) -> bool:
        """The artifact is here and its bytes still hash to `sha256` (reads it whole: blocking)."""
        digest = hashlib.sha256()
        try:
            with self.artifact_path(sha256).open("rb") as fh:
                while chunk := fh.read(HASH_CHUNK):
                    digest.update(chunk)
        except FileNotFoundError:
            return False
        return digest.hexdigest() == sha256

    def discard(self, sha256: str) -> None:
        """Delete the artifact (its manifests stay: `variants` leaves them out until it is back)."""
        self.artifact_path(sha256).unlink(missing_ok=True)

    def adopt(self, variant: ModelVariant) -> bool:
        """Record a variant whose bytes are already cached under the same sha256."""
        if not self.artifact_path(variant.sha256).is_file():
            return False
        self._atomic_write(self.manifest_path(variant), variant_to_json(variant).encode())
        return True

    def put(self, variant: ModelVariant, data: bytes) -> Path:
        """Verify and store an artifact and its manifest atomically."""
        digest = hashlib.sha256(data).hexdigest()
        if digest != variant.sha256:
            raise FailedPrecondition(f"artifact of {variant.key} hashes to {digest}, expected {variant.sha256}")
        path = self.artifact_path(variant.sha256)
        self._atomic_write(path, data)
        self._atomic_write(self.manifest_path(variant), variant_to_json(variant).encode())
        return path

    def variants(self) -> list[ModelVariant]:
        """Every cached variant whose artifact is present."""
        found = []
        for manifest in sorted(self.root.glob("*.json")):
            try:
                variant = variant_from_json(manifest.read_text())
            except (ValueError, KeyError, TypeError):
                continue
            if self.artifact_path(variant.sha256).is_file():
                found.append(variant)
        return found

    def _remove_temporaries(self) -> None:
        """Delete the temporary files of writes a crash or kill interrupted (never renamed)."""
        for path in self.root.glob("*.tmp"):
            if TEMPORARY.search(path.name):
                log.info("removing %s, left by an interrupted download", path.name)
                path.unlink(missing_ok=True)

    def _rename_old_manifests(self) -> None:
        """Move manifests named as before (`name--version--precision.json`) to their names now;
        unreadable ones are left where they are (`variants` skips them)."""
        for old in self.root.glob("*.json"):
            if not OLD_MANIFEST.match(old.name):
                continue
            try:
                variant = variant_from_json(old.read_text())
            except (ValueError, KeyError, TypeError):
                continue
            new = self.manifest_path(variant)
            if not new.exists():
                os.replace(old, new)
            else:
                old.unlink(missing_ok=True)

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        temp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")  # writers of one file never share a temp
        try:
            with temp.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)


class L1Cache:
    """Loaded models keyed by variant key, evicting least-recently-used beyond a byte budget."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()

    @property
    def bytes_used(self) -> int:
        return sum(size for _, size in self._items.values())

    def keys(self) -> list[str]:
        return list(self._items)

    def values(self) -> list[Any]:
        """Everything loaded, without touching LRU order or the hit/miss counters."""
        return [value for value, _ in self._items.values()]

    def peek(self, key: str) -> Any | None:
        """The value, without touching LRU order or the hit/miss counters."""
        item = self._items.get(key)
        return None if item is None else item[0]

    def get(self, key: str) -> Any | None:
        item = self._items.get(key)
        if item is None:
            CACHE_EVENTS.labels("miss").inc()
            return None
        self._items.move_to_end(key)
        _HITS.inc()
        return item[0]

    def put(self, key: str, value: Any, size: int) -> list[str]:
        """Insert and return the keys evicted to stay within the budget (never the new one)."""
        self._items[key] = (value, size)
        self._items.move_to_end(key)
        evicted = []
        while self.bytes_used > self.max_bytes and len(self._items) > 1:
            old, _ = self._items.popitem(last=False)
            evicted.append(old)
            CACHE_EVENTS.labels("eviction").inc()
        CACHE_BYTES.set(self.bytes_used)
        return evicted

    def remove(self, key: str) -> bool:
        found = self._items.pop(key, None) is not None
        CACHE_BYTES.set(self.bytes_used)
        return found
