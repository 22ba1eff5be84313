"""Durable registry backend: SQLite catalogue plus a content-addressed artifact directory."""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from services.common import model_metadata
from services.common.errors import AlreadyExists
from services.common.model_spec import ModelVariant, TensorSpec, Tombstone

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS variants (
  name TEXT NOT NULL, version TEXT NOT NULL, precision TEXT NOT NULL,
  format TEXT NOT NULL, sha256 TEXT NOT NULL, size_bytes INTEGER NOT NULL,
  metadata TEXT NOT NULL, inputs TEXT NOT NULL, outputs TEXT NOT NULL,
  created_at REAL NOT NULL,
  PRIMARY KEY (name, version, precision)
);
CREATE TABLE IF NOT EXISTS measurements (
  name TEXT NOT NULL, version TEXT NOT NULL, precision TEXT NOT NULL, node_class TEXT NOT NULL,
  node_id TEXT NOT NULL, latency_ms REAL NOT NULL, memory_bytes INTEGER NOT NULL,
  measured_at REAL NOT NULL,
  PRIMARY KEY (name, version, precision, node_class)
);
CREATE TABLE IF NOT EXISTS deployments (
  model TEXT PRIMARY KEY, spec_json TEXT NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tombstones (
  name TEXT NOT NULL, version TEXT NOT NULL, precision TEXT NOT NULL, sha256 TEXT NOT NULL,
  deleted_at REAL NOT NULL,
  PRIMARY KEY (name, version, precision)
);
CREATE INDEX IF NOT EXISTS tombstones_by_time ON tombstones (deleted_at);
"""


def _specs_to_json(specs: list[TensorSpec]) -> str:
    return json.dumps([[s.name, s.datatype, list(s.shape)] for s in specs])


def _specs_from_json(text: str) -> list[TensorSpec]:
    return [TensorSpec(n, d, tuple(shape)) for n, d, shape in json.loads(text)]


def _row_to_variant(row: tuple) -> ModelVariant:
    name, version, precision, fmt, sha, size, meta, inputs, outputs, created = row
    return ModelVariant(
        name=name, version=version, precision=precision, format=fmt, sha256=sha,
        size_bytes=size, metadata=json.loads(meta), inputs=_specs_from_json(inputs),
        outputs=_specs_from_json(outputs), created_at=created,
    )


def _measured_keys(node_class: str, latency_ms: float, memory_bytes: int) -> dict[str, str]:
    """A runtime's measurement as the metadata keys a variant shows it under."""
    return {f"{model_metadata.LATENCY_PREFIX}{node_class}": f"{latency_ms:.4f}",
            f"{model_metadata.MEMORY_PREFIX}{node_class}": str(memory_bytes)}


class RegistryStore:
    """Blocking store; the core calls it from worker threads."""

    def __init__(self, data_dir: str | Path):
        self.root = Path(data_dir)
        self.blobs = self.root / "artifacts" / "sha256"
        self.incoming = self.root / "incoming"
        self.deltas = self.root / "artifacts" / "deltas"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._drop_incoming()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "catalogue.sqlite3", check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._db.commit()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256[:2] / sha256

    def has_blob(self, sha256: str) -> bool:
        return self.blob_path(sha256).is_file()

    def _drop_incoming(self) -> None:
        """Remove uploads (and deltas) a registry that died (kill -9, power loss) left half
        written: nothing else would ever delete them, and none is being written before the store
        opens."""
        for leftover in [*self.incoming.iterdir(), *self.deltas.glob("*.part")]:
            if leftover.is_file():
                log.info("removing %s, left half written by a registry that stopped", leftover)
                leftover.unlink(missing_ok=True)

    def add_variant(self, temp_path: Path, v: ModelVariant) -> ModelVariant:
        """Move the verified upload at `temp_path` into the content-addressed store as `v`'s
        artifact and catalogue `v`, as one step under the store lock; the variant catalogued. A
        variant of that name, version and precision with the same artifact is a push made again
        (its answer lost, say): that variant, as it was, unless its metadata gives a key another
        value than the variant shows (`model_metadata.conflicts`). That, or another artifact, is
        ALREADY_EXISTS and leaves no artifact behind (the artifact is kept only while a variant
        refers to it, so a rejected push cannot be fetched nor fill the disk)."""
        with temp_path.open("rb") as fh:  # the slow part, outside the lock
            os.fsync(fh.fileno())
        final = self.blob_path(v.sha256)
        with self._lock:
            if (stored := self._pushed_before(v.name, v.version, v.precision, v.sha256, v.metadata)) is not None:
                temp_path.unlink(missing_ok=True)
                return stored
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp_path, final)  # the same bytes when it was there: their hash is its name
            try:
                self._insert(v)
            except BaseException:
                if not self._db.execute("SELECT 1 FROM variants WHERE sha256 = ?", (v.sha256,)).fetchone():
                    final.unlink(missing_ok=True)
                raise
        return v

    def pushed_before(self, name: str, version: str, precision: str, sha256: str,
                      metadata: dict[str, str]) -> ModelVariant | None:
        """The catalogued variant `name` `version` `precision` when its artifact is `sha256` and
        `metadata` gives no key another value than it shows (None when there is none;
        ALREADY_EXISTS when its artifact is another, or a value differs)."""
        with self._lock:
            return self._pushed_before(name, version, precision, sha256, metadata)

    def _pushed_before(self, name: str, version: str, precision: str, sha256: str,
                       metadata: dict[str, str]) -> ModelVariant | None:
        row = self._db.execute("SELECT * FROM variants WHERE name = ? AND version = ? AND precision = ?",
                               (name, version, precision)).fetchone()
        if row is None:
            return None
        if row[4] != sha256:
            raise AlreadyExists(f"model '{name}' version {version} precision {precision} already exists "
                                f"(artifact sha256:{row[4][:12]}, this push's sha256:{sha256[:12]})")
        stored = _row_to_variant(row)
        measured = self._db.execute(
            "SELECT node_class, latency_ms, memory_bytes FROM measurements WHERE name = ? AND version = ? "
            "AND precision = ?", (name, version, precision)).fetchall()
        shown = {**stored.metadata, **{k: v for m in measured for k, v in _measured_keys(*m).items()}}
        if differing := model_metadata.conflicts(stored.metadata, shown, metadata):
            raise model_metadata.MetadataDiffers(name, version, precision, differing)
        return stored

    def _insert(self, v: ModelVariant) -> None:
        row = (
            v.name, v.version, v.precision, v.format, v.sha256, v.size_bytes,
            json.dumps(v.metadata, sort_keys=True), _specs_to_json(v.inputs),
            _specs_to_json(v.outputs), v.created_at,
        )
        try:
            self._db.execute("INSERT INTO variants VALUES (?,?,?,?,?,?,?,?,?,?)", row)
            self._db.execute("DELETE FROM tombstones WHERE name = ? AND version = ? AND precision = ?",
                             (v.name, v.version, v.precision))  # pushed again: no longer deleted
            self._db.commit()
        except sqlite3.IntegrityError:
            self._db.rollback()
            raise AlreadyExists(f"model '{v.name}' version {v.version} precision {v.precision} "
                                "already exists") from None

    def variants_of_artifacts(self, sha256s: list[str]) -> list[ModelVariant]:
        """The variants stored as these artifacts (no measurements merged)."""
        if not sha256s:
            return []
        marks = ",".join("?" * len(sha256s))
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM variants WHERE sha256 IN ({marks})", sha256s).fetchall()
        return [_row_to_variant(r) for r in rows]

    def delete_variants(self, name: str, version: str, precision: str = "", when: float | None = None,
                        tombstones_since: float = 0.0) -> tuple[list[ModelVariant], list[str]]:
        """Remove model `name` `version` (its `precision` variant, else all) from the catalogue with
        its measurements, leaving a tombstone of each variant (deleted `when`, default now) and
        dropping those of deletions before `tombstones_since` in the same transaction, then every
        artifact and kept delta no variant refers to any more, as one step under the store lock: a
        push of the same bytes moves its upload in and catalogues it under this lock too, so it
        keeps its artifact. The variants removed (none: nothing matched) and the artifacts deleted
        (sha256s)."""
        when = time.time() if when is None else when
        where = "name = ? AND version = ?" + (" AND precision = ?" if precision else "")
        args = (name, version, precision) if precision else (name, version)
        with self._lock:
            removed = [_row_to_variant(r) for r in self._db.execute(f"SELECT * FROM variants WHERE {where}", args)]
            if not removed:
                return [], []
            self._db.execute(f"DELETE FROM variants WHERE {where}", args)
            self._db.execute(f"DELETE FROM measurements WHERE {where}", args)
            self._db.executemany("INSERT OR REPLACE INTO tombstones VALUES (?,?,?,?,?)",
                                 [(v.name, v.version, v.precision, v.sha256, when) for v in removed])
            self._drop_tombstones(tombstones_since)
            self._db.commit()
            referenced = {sha for (sha,) in self._db.execute("SELECT DISTINCT sha256 FROM variants")}
            freed = sorted({v.sha256 for v in removed} - referenced)
            for sha in freed:
                self.blob_path(sha).unlink(missing_ok=True)
            self._drop_deltas(referenced)
        return removed, freed

    def tombstones(self, name: str = "", since: float = 0.0) -> list[Tombstone]:
        """The tombstones of deleted variants (of model `name`, else all) deleted at or after
        `since`, oldest first."""
        where, args = ("AND name = ?", (since, name)) if name else ("", (since,))
        with self._lock:
            rows = self._db.execute("SELECT name, version, precision, sha256, deleted_at FROM tombstones "
                                    f"WHERE deleted_at >= ? {where} ORDER BY deleted_at, name, version, precision",
                                    args).fetchall()
        return [Tombstone(*row) for row in rows]

    def drop_tombstones(self, before: float) -> int:
        """Delete the tombstones of variants deleted before `before`; how many went."""
        with self._lock:
            dropped = self._drop_tombstones(before)
            self._db.commit()
        return dropped

    def _drop_tombstones(self, before: float) -> int:
        return self._db.execute("DELETE FROM tombstones WHERE deleted_at < ?", (before,)).rowcount

    def _drop_deltas(self, referenced: set[str]) -> None:
        """Delete the kept deltas from or to an artifact outside `referenced` (one being made is
        left to its maker: its source read failing, or this sweep the next time)."""
        if not self.deltas.is_dir():
            return
        for path in self.deltas.iterdir():
            base, _, target = path.name.partition("-")
            if not path.name.endswith(".part") and not {base, target} <= referenced:
                path.unlink(missing_ok=True)

    def delta_path(self, base: str, target: str) -> Path:
        """Where the delta from artifact `base` to `target` is kept once made."""
        return self.deltas / f"{base}-{target}"

    def variants(self, name: str = "") -> list[ModelVariant]:
        """Variants with their latest measurements merged into metadata."""
        where, args = ("WHERE name = ?", (name,)) if name else ("", ())
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM variants {where}", args).fetchall()
            measured = self._db.execute(
                "SELECT name, version, precision, node_class, latency_ms, memory_bytes "
                f"FROM measurements {where}", args).fetchall()
        variants = [_row_to_variant(r) for r in rows]
        by_key = {(v.name, v.version, v.precision): v for v in variants}
        for name_, version, precision, node_class, latency, memory in measured:
            v = by_key.get((name_, version, precision))
            if v is not None:
                v.metadata.update(_measured_keys(node_class, latency, memory))
        return variants

    def record_measurement(self, name: str, version: str, precision: str, node_class: str,
                           node_id: str, latency_ms: float, memory_bytes: int, when: float) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO measurements VALUES (?,?,?,?,?,?,?,?)",
                (name, version, precision, node_class, node_id, latency_ms, memory_bytes, when))
            self._db.commit()

    def put_deployment(self, model: str, spec_json: str, when: float) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO deployments VALUES (?,?,?)", (model, spec_json, when))
            self._db.commit()

    def delete_deployment(self, model: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM deployments WHERE model = ?", (model,))
            self._db.commit()

    def deployments(self, model: str = "") -> list[tuple[str, str, float]]:
        where, args = ("WHERE model = ?", (model,)) if model else ("", ())
        with self._lock:
            return self._db.execute(f"SELECT model, spec_json, updated_at FROM deployments {where}",
                                    args).fetchall()
