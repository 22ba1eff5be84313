"""What the registry sends a caller asking for an artifact: the artifact, or a delta against one it
holds, made once in a thread of its own."""
from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import re
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from services.common import delta
from services.common.errors import ArtifactNotFound, InvalidArgument
from services.common.model_spec import version_key
from services.registry.store import RegistryStore

log = logging.getLogger(__name__)
T = TypeVar("T")
READ_CHUNK = 1 << 20
SHA256 = re.compile(r"[0-9a-f]{64}")


def digest(text: str) -> str:
    """An artifact's sha256 as asked for: 64 hexadecimal digits, in either case, `sha256:` before
    them or not (as `cnei models list` prints it); INVALID_ARGUMENT for anything else."""
    sha = text.strip().removeprefix("sha256:").lower()
    if not SHA256.fullmatch(sha):
        raise InvalidArgument(f"artifact digest {text!r} is not a sha256: 64 hexadecimal digits")
    return sha
DELTA = "delta"
DELTA_MAX_BYTES = 256 << 20  # larger artifacts are sent whole (a delta is made in memory)
DELTA_WORTH = 0.8  # a delta is sent when it is under this fraction of the artifact


async def run_in(executor: Executor, fn: Callable[..., T], *args) -> T:
    """`fn(*args)` in a thread of `executor`, in this task's context (as asyncio.to_thread runs it
    in the default executor's)."""
    call = functools.partial(contextvars.copy_context().run, fn, *args)
    return await asyncio.get_running_loop().run_in_executor(executor, call)


def read_chunks(path: Path) -> Iterator[bytes]:
    """The file's bytes in chunks, the file opened now: one deleted meanwhile (its version
    deleted) is still sent whole."""
    fh = path.open("rb")

    def chunks() -> Iterator[bytes]:
        with fh:
            while data := fh.read(READ_CHUNK):
                yield data
    return chunks()


@dataclass(frozen=True)
class Sending:
    """An artifact's bytes as sent: `encoding` "" (the artifact) or DELTA against `base`."""

    encoding: str
    base: str
    chunks: Iterator[bytes]


class ArtifactSender:
    """Picks what to send; `catalogue`: the executor of quick store calls. Deltas are made one at
    a time (each takes about twice the artifact's size in memory) in a thread of their own, so a
    delta being made, and the callers awaiting it, hold no thread other calls need."""

    def __init__(self, store: RegistryStore, catalogue: Executor):
        self.store = store
        self._catalogue = catalogue
        self._maker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry-delta")
        self._making: dict[Path, asyncio.Future[bool]] = {}

    def close(self) -> None:
        self._maker.shutdown(wait=False, cancel_futures=True)

    async def artifact_for(self, sha256: str, have: list[str]) -> Sending:
        """What to send a caller asking for `sha256` that holds the artifacts `have`: a delta
        against the one that is the nearest other version of the same model (same precision first,
        then the latest version) when the delta is under DELTA_WORTH of the artifact, else the
        artifact (NOT_FOUND at once, not at the first chunk)."""
        if len(have) > delta.MAX_BASES:
            raise InvalidArgument(f"'have' lists {len(have)} artifacts; at most {delta.MAX_BASES}")
        sha256 = digest(sha256)
        if not await run_in(self._catalogue, self._known, sha256):
            raise ArtifactNotFound(sha256)
        base = await run_in(self._catalogue, self._delta_base, sha256,
                            [h for h in have if h != sha256 and SHA256.fullmatch(h)])
        if base is not None and await self._delta_worth_sending(base, sha256):
            try:
                return Sending(DELTA, base, await run_in(self._catalogue, read_chunks,
                                                         self.store.delta_path(base, sha256)))
            except FileNotFoundError:  # deleted since (a version deleted): the artifact instead
                pass
        return Sending("", "", await run_in(self._catalogue, self.artifact_chunks, sha256))

    def _known(self, sha256: str) -> bool:
        return bool(SHA256.fullmatch(sha256 or "")) and self.store.has_blob(sha256)

    def artifact_chunks(self, sha256: str) -> Iterator[bytes]:
        """Blocking iterator over an artifact's bytes (NOT_FOUND at once, not at the first chunk)."""
        try:
            if self._known(sha256):
                return read_chunks(self.store.blob_path(sha256))
        except FileNotFoundError:  # deleted since
            pass
        raise ArtifactNotFound(sha256)

    def _delta_base(self, sha256: str, have: list[str]) -> str | None:
        size = _size_or_none(self.store.blob_path(sha256))
        if not have or size is None or size > DELTA_MAX_BYTES:
            return None
        targets = self.store.variants_of_artifacts([sha256])
        held = [v for v in self.store.variants_of_artifacts(have)
                if (held_size := _size_or_none(self.store.blob_path(v.sha256))) is not None
                and held_size <= DELTA_MAX_BYTES]
        candidates = [(v.precision == t.precision, version_key(v.version), v.sha256)
                      for t in targets for v in held if v.name == t.name]
        return max(candidates)[2] if candidates else None

    async def _delta_worth_sending(self, base: str, target: str) -> bool:
        """Whether the kept delta `base` -> `target` is worth sending, made first when it never was:
        callers asking for it meanwhile await that one making (one caller going away stops it for
        none)."""
        path = self.store.delta_path(base, target)
        if (size := await run_in(self._catalogue, _size_or_none, path)) is not None:
            return size > 0
        making = self._making.get(path)
        if making is None:
            making = self._making[path] = asyncio.ensure_future(run_in(self._maker, self._make_once, base, target))
            making.add_done_callback(lambda _: self._making.pop(path, None))
        return await asyncio.shield(making)

    def _make_once(self, base: str, target: str) -> bool:
        """(In the delta thread.) Make the delta unless it was made meanwhile; whether it is worth
        sending (False, and logged, when it cannot be made)."""
        path = self.store.delta_path(base, target)
        try:
            if not path.is_file():
                self._make_delta(base, target, path)
            return path.stat().st_size > 0
        except (MemoryError, OSError) as exc:
            log.warning("delta %s -> %s not made (%s): the artifact is sent whole", base[:12], target[:12], exc)
            return False

    def _make_delta(self, base: str, target: str, path: Path) -> None:
        """Keep the delta at `path`, or an empty file when it would save too little."""
        target_bytes = self.store.blob_path(target).read_bytes()
        made = delta.encode(self.store.blob_path(base).read_bytes(), target_bytes)
        worth = len(made) < DELTA_WORTH * len(target_bytes)
        log.info("delta %s -> %s: %d of %d bytes (%s)", base[:12], target[:12], len(made), len(target_bytes),
                 "kept" if worth else "not worth it: the artifact is sent whole")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.part")  # one maker at a time (the delta thread)
        try:
            partial.write_bytes(made if worth else b"")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)


def _size_or_none(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None
