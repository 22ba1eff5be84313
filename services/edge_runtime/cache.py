"""A runtime's disk cache: verified artifacts and their manifests, within a byte budget, least
recently used leaving first (the models in memory: `l1.L1Cache`)."""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Set
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote

from prometheus_client import Counter, Gauge

from services.common.errors import FailedPrecondition, ResourceExhausted
from services.common.model_spec import ModelVariant, TensorSpec
from services.edge_runtime.eviction import CachedArtifact, choose_evictions, newest_versions

log = logging.getLogger(__name__)
TEMPORARY = re.compile(r"\.[0-9a-f]{32}\.tmp$")  # what `_atomic_write` writes before its rename
OLD_MANIFEST = re.compile(r"^[^+]*--[^+]*--[^+]*\.json$")  # name--version--precision.json: ambiguous names
HASH_CHUNK = 1 << 20
DISK_EVICTIONS = Counter("cnei_disk_cache_evictions_total",
                         "Artifacts (with their manifests) deleted from the disk cache to make room for others")
DISK_BYTES = Gauge("cnei_disk_cache_bytes", "Bytes of artifacts and manifests in the disk cache")
Keep = Callable[[CachedArtifact], bool]  # an artifact that must stay (a model in memory runs it, a deployed version's)


class DiskCacheFull(ResourceExhausted):
    """An artifact that does not fit the disk cache's budget beside those that cannot leave it."""

    def __init__(self, key: str, needed: int, kept: int, budget: int):
        self.key, self.needed, self.kept, self.budget = key, needed, kept, budget
        super().__init__(
            f"disk cache full: the artifact of {key} needs {needed} bytes, and {kept} bytes of its budget of "
            f"{budget} bytes (CNEI_RUNTIME_DISK_CACHE_MAX_BYTES) are artifacts that cannot be evicted (in memory, "
            f"being pulled or measured, of a deployed version, or the newest cached version of their model)")


class Deleted(NamedTuple):
    """A variant deleted from the registry, as the disk cache forgets it (`DiskCache.forget`)."""

    name: str
    version: str
    precision: str
    sha256: str = ""  # a tombstone's: only a manifest naming these bytes goes ("": whichever)


@dataclass(frozen=True)
class Contents:
    """What the disk cache held when it was read (`DiskCache.contents`): every artifact with its
    size, last use and variants; `change`: the cache's last change then (a later one makes it stale)."""

    artifacts: tuple[CachedArtifact, ...]
    change: int

    def variants(self) -> list[ModelVariant]:
        """Every cached variant whose artifact was present."""
        return [v for artifact in self.artifacts for v in artifact.variants]


def variant_to_json(v: ModelVariant) -> str:
    return json.dumps(asdict(v), sort_keys=True)


def variant_from_json(text: str) -> ModelVariant:
    obj = json.loads(text)
    obj["inputs"] = [TensorSpec(s["name"], s["datatype"], tuple(s["shape"])) for s in obj["inputs"]]
    obj["outputs"] = [TensorSpec(s["name"], s["datatype"], tuple(s["shape"])) for s in obj["outputs"]]
    return ModelVariant(**obj)


def _named_by(manifest: Path) -> str:
    """The sha256 a manifest names, read as loosely as can be ("" when it names none or is gone)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return str(json.loads(manifest.read_text()).get("sha256", ""))
    return ""


class DiskCache:
    """Artifacts by sha256 plus the manifest of each cached variant (for offline resolution),
    within `max_bytes` (0: no limit): storing one that would go over it first deletes the least
    recently used artifacts (an artifact's file time: set when it is stored, loaded, or leaves
    memory), never those pinned (being pulled, loaded or measured), those the caller keeps (in
    memory, deployed), or the newest cached version of each model in each precision. Variants
    deleted from the registry are `forget`-ten: their manifests go at once, their bytes once no
    manifest names them and no model in memory runs them (an artifact no manifest names is
    deleted when the cache opens too)."""

    def __init__(self, root: str | Path, max_bytes: int = 0):
        """Opens (or makes) the cache at `root`, deleting what interrupted writes left there."""
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._changes = itertools.count(1)  # each write, deletion or touch here takes the next number
        self._change = 0
        self._remove_temporaries()
        self._rename_old_manifests()
        self._room = threading.Lock()  # one store (or forgetting) at a time makes room and writes
        self._pins_lock = threading.Lock()  # pins, and the deletions that must not take a pinned artifact
        self._pins: Tally[str] = Tally()
        self.forget(())  # what a deleted variant in memory left when the process stopped
        DISK_BYTES.set(self.bytes_used())

    def artifact_path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.onnx"

    def manifest_path(self, variant: ModelVariant) -> Path:
        """`name+version+precision.json`, each part percent-encoded (`+` included): one file per
        variant, whatever its name and version hold (`a--b` v1 and `a` v`b--1` used to share one)."""
        return self._manifest_of(variant.name, variant.version, variant.precision)

    def _manifest_of(self, *parts: str) -> Path:
        return self.root / ("+".join(quote(part, safe="") for part in parts) + ".json")

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
        self._changed()

    def adopt(self, variant: ModelVariant) -> bool:
        """Record a variant whose bytes are already cached under the same sha256."""
        if not self.artifact_path(variant.sha256).is_file():
            return False
        self._atomic_write(self.manifest_path(variant), variant_to_json(variant).encode())
        return True

    def put(self, variant: ModelVariant, data: bytes, keep: Keep | None = None,
            contents: Contents | None = None) -> Path:
        """Verify and store an artifact and its manifest atomically, making room for them within
        the budget first (DiskCacheFull when even that cannot; `keep`: variants not to evict;
        `contents`: the caller's read of the cache, read again only if it changed since)."""
        digest = hashlib.sha256(data).hexdigest()
        if digest != variant.sha256:
            raise FailedPrecondition(f"artifact of {variant.key} hashes to {digest}, expected {variant.sha256}")
        path, manifest = self.artifact_path(variant.sha256), variant_to_json(variant).encode()
        with self._room:
            if not path.is_file():
                self._make_room(variant, len(data) + len(manifest), keep or (lambda v: False), contents)
            self._atomic_write(path, data)
            self._atomic_write(self.manifest_path(variant), manifest)
            self.touch(variant.sha256)
            DISK_BYTES.set(self.bytes_used())
        return path

    def forget(self, deleted: Iterable[Deleted], in_use: Set[str] = frozenset()) -> list[str]:
        """Variants deleted from the registry: delete their manifests, so that nothing resolves
        them from here again (offline, after a restart too), then, in one sweep for them all, every
        artifact no manifest names any more (shared bytes stay while another variant names them),
        but those `in_use` (sha256s a model in memory runs: they go when it has left) or pinned.
        An entry's `sha256` (a tombstone's): only a manifest naming those bytes goes, so a variant
        pushed again with other bytes and stored meanwhile stays. The sha256s of the artifacts deleted."""
        with self._room:
            for name, version, precision, sha256 in deleted:
                manifest = self._manifest_of(name, version, precision)
                if not sha256 or _named_by(manifest) == sha256:
                    manifest.unlink(missing_ok=True)
            named = self._named_artifacts()
            with self._pins_lock:
                spared = named | set(in_use) | set(self._pins)
                dropped = sorted(path.stem for path in self.root.glob("*.onnx") if path.stem not in spared)
                for sha256 in dropped:
                    self.artifact_path(sha256).unlink(missing_ok=True)
            self._changed()
            if dropped:
                log.info("deleted %s from the disk cache: no variant here names them any more",
                         ", ".join(sha256[:12] for sha256 in dropped))
                DISK_BYTES.set(self.bytes_used())
        return dropped

    @contextlib.contextmanager
    def pinned(self, *sha256s: str) -> Iterator[None]:
        """Keep these artifacts from eviction while the block runs (a pull, a load, a measurement)."""
        with self._pins_lock:
            self._pins.update(sha256s)
        try:
            yield
        finally:
            with self._pins_lock:
                for sha256 in sha256s:
                    self._pins[sha256] -= 1
                    if self._pins[sha256] <= 0:
                        del self._pins[sha256]

    def touch(self, sha256: str) -> None:
        """Record a use of the artifact (its file time; the least recently used leave first)."""
        now = time.time_ns()
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.artifact_path(sha256), ns=(now, now))
        self._changed()

    def bytes_used(self) -> int:
        """Bytes of the artifacts and manifests here."""
        total = 0
        for path in self.root.iterdir():
            if path.suffix in (".onnx", ".json"):
                with contextlib.suppress(FileNotFoundError):
                    total += path.stat().st_size
        return total

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

    def contents(self) -> Contents:
        """Every artifact here with its size, last use and variants, read once (`Contents`)."""
        change = self._change  # taken first: a change while the files are read makes it stale
        return Contents(tuple(self._cached()), change)

    def current(self, contents: Contents) -> bool:
        """Nothing here changed since `contents` was read."""
        return contents.change == self._change

    def _changed(self) -> None:
        self._change = next(self._changes)

    def _make_room(self, incoming: ModelVariant, size: int, keep: Keep, contents: Contents | None = None) -> None:
        """Delete the least recently used artifacts that may go until `size` more bytes fit
        (`contents`: a read of the cache, used if nothing changed since)."""
        if self.max_bytes <= 0:
            return
        cached = list(contents.artifacts) if contents is not None and self.current(contents) else self._cached()
        kept = newest_versions([v for a in cached for v in a.variants] + [incoming])
        kept |= {a.sha256 for a in cached if keep(a)}
        with self._pins_lock:  # an artifact pinned from here on waits for the deletions below
            protected = kept | set(self._pins)
            chosen = choose_evictions(cached, size, self.max_bytes, protected)
            if chosen is None:
                raise DiskCacheFull(incoming.key, size, sum(a.size for a in cached if a.sha256 in protected),
                                    self.max_bytes)
            for artifact in chosen:
                self._evict(artifact)

    def _evict(self, artifact: CachedArtifact) -> None:
        self.artifact_path(artifact.sha256).unlink(missing_ok=True)
        for variant in artifact.variants:
            self.manifest_path(variant).unlink(missing_ok=True)
        self._changed()
        DISK_EVICTIONS.inc()
        log.info("evicted %s (%s, %d bytes) from the disk cache", artifact.sha256[:12],
                 ", ".join(v.key for v in artifact.variants) or "no manifest", artifact.size)

    def _cached(self) -> list[CachedArtifact]:
        """Every artifact here with its size (manifests included), last use and variants."""
        manifests: dict[str, list[tuple[ModelVariant, int]]] = {}
        for path in self.root.glob("*.json"):
            try:
                variant, size = variant_from_json(path.read_text()), path.stat().st_size
            except (OSError, ValueError, KeyError, TypeError):
                continue
            manifests.setdefault(variant.sha256, []).append((variant, size))
        cached = []
        for path in self.root.glob("*.onnx"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            held = manifests.get(path.stem, [])
            cached.append(CachedArtifact(path.stem, stat.st_size + sum(size for _, size in held), stat.st_mtime_ns,
                                         tuple(v for v, _ in held)))
        return cached

    def _named_artifacts(self) -> set[str]:
        """The sha256 every manifest here names, read as loosely as can be (a manifest another
        release wrote, which `variants` may not read, still keeps its artifact)."""
        return {_named_by(path) for path in self.root.glob("*.json")}

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

    def _atomic_write(self, path: Path, data: bytes) -> None:
        temp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")  # writers of one file never share a temp
        try:
            with temp.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)
            self._changed()
