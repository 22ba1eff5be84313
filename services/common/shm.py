"""Triton's system shared memory extension: a client on the same host registers a POSIX shared
memory object (`/dev/shm/<key>`) as a named region; requests then name the region, offset and
size holding an input (instead of sending its bytes) or receiving an output.

Transport-free: the OIP codec reads inputs and writes outputs through `SharedMemoryRegions`.
With `directory` set (coordinator workers sharing one port, or the coordinator and its compiled
front door), registrations are files there, created exclusively, so a region registered through
one process is usable through every other; each process opens the object itself when first used.
A registration file is `shm-region-<hex of the name>` holding three lines: key, offset, byte_size
(the front door reads the same files, services/coordinator/frontdoor/src/shm.cc)."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

SHM_ROOT = Path("/dev/shm")
PREFIX = "shm-region-"
# Request/response tensor parameters naming a region (Triton's names).
REGION, BYTE_SIZE, OFFSET = "shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"


@dataclass(frozen=True)
class Region:
    name: str
    key: str  # the POSIX shared memory object's name, as shm_open takes it ("/data" or "data")
    offset: int  # where the region starts in the object
    byte_size: int


@dataclass(frozen=True)
class TensorPlace:
    """Where one tensor lives: `byte_size` bytes at `offset` in region `region`."""

    region: str
    byte_size: int
    offset: int = 0


def place_of(params: dict, what: str) -> TensorPlace | None:
    """The shared memory place a tensor's parameters name, or None when they name none."""
    region = params.get(REGION)
    if region is None:
        return None
    size, offset = params.get(BYTE_SIZE), params.get(OFFSET, 0)
    if not isinstance(region, str) or not region:
        raise InvalidArgument(f"{what}: '{REGION}' must be a region name (a string)")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InvalidArgument(f"{what}: '{BYTE_SIZE}' (a non-negative integer) is required with '{REGION}'")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidArgument(f"{what}: '{OFFSET}' must be a non-negative integer")
    return TensorPlace(region, size, offset)


def cuda_status(name: str = "") -> list:
    """Triton's CUDA shared memory, which this server does not offer: no region, ever."""
    if name:
        raise NotFound(f"no CUDA shared memory region named '{name}' is registered")
    return []


def refuse_cuda(name: str) -> None:
    raise FailedPrecondition(f"CUDA shared memory region '{name}': this server does not take tensors in "
                             f"GPU memory; use system shared memory")


def _object_path(key: str) -> Path:
    name = key[1:] if key.startswith("/") else key
    if not name or "/" in name or name in (".", "..") or not name.isprintable() or " " in name:
        raise InvalidArgument(f"shared memory key '{key}' is not a POSIX shared memory name ('/name')")
    return SHM_ROOT / name


class _Opened:
    """One region's object, open in this process. Tensors are copied in and out with
    pread/pwrite, never through a map: the client owns the object and may shrink it at any time
    (a map's pages past the new end would fault, SIGBUS, killing the server)."""

    def __init__(self, region: Region):
        self.region = region
        self.path = path = _object_path(region.key)
        try:
            self.fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise NotFound(f"shared memory key '{region.key}' does not exist on this host") from None
        except PermissionError:
            raise InvalidArgument(f"shared memory key '{region.key}' cannot be opened for reading and writing") from None
        try:
            stat = os.fstat(self.fd)
            self.identity = (stat.st_dev, stat.st_ino)
            end = region.offset + region.byte_size
            if end > stat.st_size:
                raise InvalidArgument(f"region '{region.name}': offset {region.offset} + byte_size "
                                      f"{region.byte_size} is beyond the {stat.st_size} bytes of '{region.key}'")
        except BaseException:
            os.close(self.fd)
            raise

    def current(self, region: Region) -> bool:
        """Whether this is still `region` over the object its key names now (a client may have
        made the object afresh, or registered the name again through another process)."""
        if region != self.region:
            return False
        try:
            stat = os.stat(self.path)
        except OSError:
            return False
        return (stat.st_dev, stat.st_ino) == self.identity

    def read(self, start: int, size: int, what: str) -> bytes:
        """`size` bytes at `start` of the object (InvalidArgument when it no longer holds them)."""
        parts, done = [], 0
        while done < size:
            part = os.pread(self.fd, size - done, start + done)
            if not part:
                raise self._shrunk(start, size, what)
            parts.append(part)
            done += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write(self, start: int, data: bytes | memoryview, what: str) -> None:
        """`data` at `start` of the object, which must still hold that range (InvalidArgument)."""
        view, done = memoryview(data).cast("B"), 0
        if start + len(view) > os.fstat(self.fd).st_size:
            raise self._shrunk(start, len(view), what)
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], start + done)

    def _shrunk(self, start: int, size: int, what: str) -> InvalidArgument:
        held = os.fstat(self.fd).st_size
        return InvalidArgument(f"{what}: shared memory region '{self.region.name}' is smaller than the range "
                               f"asked for: bytes {start} to {start + size} of '{self.region.key}', which now "
                               f"holds {held} bytes (shrunk after it was registered)")

    def close(self) -> None:
        os.close(self.fd)


class SharedMemoryRegions:
    def __init__(self, directory: str = "", enabled: bool = True):
        """`enabled` False: the extension is turned off (nothing can be registered)."""
        self.enabled = enabled
        self.dir = Path(directory) if directory else None
        self._local: dict[str, Region] = {}  # registrations, when not shared through `dir`
        self._opened: dict[str, _Opened] = {}
        self._lock = threading.Lock()  # inputs are read on the event loop, outputs may be written off it

    # --- the extension's three calls ----------------------------------------------------------
    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        if not self.enabled:
            raise FailedPrecondition(f"shared memory region '{name}': system shared memory is turned off on "
                                     f"this server (its SHARED_MEMORY setting)")
        if not name:
            raise InvalidArgument("a shared memory region needs a name")
        if byte_size <= 0:
            raise InvalidArgument(f"region '{name}': byte_size must be positive")
        region = Region(name, key, int(offset), int(byte_size))
        opened = _Opened(region)  # the object exists and is large enough, or a clear error
        try:
            if self.dir is not None:
                self.dir.mkdir(parents=True, exist_ok=True)
                # written whole under a temporary name, then linked: the link fails when the
                # name exists, and no worker ever reads half a registration
                tmp = self.dir / f".{PREFIX}{os.getpid()}-{threading.get_ident()}.tmp"
                tmp.write_text(f"{region.key}\n{region.offset}\n{region.byte_size}\n")
                try:
                    os.link(tmp, self._file(name))
                except FileExistsError:
                    raise self._exists(name) from None
                finally:
                    tmp.unlink(missing_ok=True)
            else:
                with self._lock:
                    if name in self._local:
                        raise self._exists(name)
                    self._local[name] = region
        except BaseException:
            opened.close()
            raise
        with self._lock:
            old = self._opened.pop(name, None)
            self._opened[name] = opened
        if old is not None:
            old.close()
        return region

    def unregister(self, name: str = "") -> None:
        """Forget region `name`, or every region when `name` is empty; unknown names are fine."""
        for region in ([self._registered(name)] if name else self.status()):
            if region is None:
                continue
            if self.dir is not None:
                self._file(region.name).unlink(missing_ok=True)
            with self._lock:
                self._local.pop(region.name, None)
                opened = self._opened.pop(region.name, None)
            if opened is not None:
                opened.close()

    def status(self, name: str = "") -> list[Region]:
        if name:
            region = self._registered(name)
            if region is None:
                raise NotFound(f"no shared memory region named '{name}' is registered")
            return [region]
        if self.dir is None:
            with self._lock:
                return sorted(self._local.values(), key=lambda r: r.name)
        regions = []
        for path in sorted(self.dir.glob(f"{PREFIX}*")) if self.dir.exists() else []:
            region = self._read(path)
            if region is not None:
                regions.append(region)
        return regions

    # --- tensors --------------------------------------------------------------------------------
    def read(self, place: TensorPlace, what: str) -> bytes:
        """A copy of the bytes at `place` (the client may reuse the region at once)."""
        with self._lock:
            opened, start = self._span(place, place.byte_size, what)
            return opened.read(start, place.byte_size, what)

    def write(self, place: TensorPlace, data: bytes | memoryview, what: str) -> None:
        if len(data) > place.byte_size:
            raise InvalidArgument(f"{what} is {len(data)} bytes, more than the {place.byte_size} "
                                  f"bytes given to it in shared memory region '{place.region}'")
        with self._lock:
            opened, start = self._span(place, len(data), what)
            opened.write(start, data, what)

    def close(self) -> None:
        with self._lock:
            opened, self._opened = list(self._opened.values()), {}
        for o in opened:
            o.close()

    # --- inside ---------------------------------------------------------------------------------
    def _span(self, place: TensorPlace, size: int, what: str) -> tuple[_Opened, int]:
        """(the region's object, open; where `place` starts in it); the lock is held."""
        if not self.enabled:
            raise InvalidArgument(f"{what} is placed in shared memory, which is turned off on this server")
        region = self._registered(place.region)
        if region is None:
            gone = self._opened.pop(place.region, None)  # unregistered through another worker
            if gone is not None:
                gone.close()
            raise NotFound(f"{what}: no shared memory region named '{place.region}' is registered")
        if place.offset + place.byte_size > region.byte_size:
            raise InvalidArgument(f"{what}: offset {place.offset} + byte_size {place.byte_size} is beyond "
                                  f"the {region.byte_size} bytes of shared memory region '{region.name}'")
        opened = self._opened.get(region.name)
        if opened is None or not opened.current(region):
            if opened is not None:
                opened.close()
            opened = self._opened[region.name] = _Opened(region)
        return opened, region.offset + place.offset

    def _registered(self, name: str) -> Region | None:
        if self.dir is None:
            return self._local.get(name)
        return self._read(self._file(name))

    def _file(self, name: str) -> Path:
        return self.dir / f"{PREFIX}{name.encode().hex()}"

    @staticmethod
    def _read(path: Path) -> Region | None:
        try:
            key, offset, size = path.read_text().split("\n")[:3]
            return Region(bytes.fromhex(path.name[len(PREFIX):]).decode(), key, int(offset), int(size))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # not a registration this code wrote

    @staticmethod
    def _exists(name: str) -> AlreadyExists:
        return AlreadyExists(f"a shared memory region named '{name}' is already registered")
