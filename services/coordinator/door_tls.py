"""The front door's own copy of the public port's TLS files: the door's gRPC file watcher hands
gRPC whatever it reads, so the coordinator gives it files that load. The live files are looked at
about once a second; once they load as a key pair (and a CA) they are written to the door's
folder, the key and certificate chain in one file replaced whole (the watcher never reads a key
of one renewal with the certificate of another). Files that do not load leave the last good copy
in place, logged."""
from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from services.common.file_reload import RELOAD_CHECK_S, Reloaded
from services.common.tls import ServerTls, check_key_pair

IDENTITY = "tls-identity.pem"  # the key, then the certificate chain
CLIENT_CA = "tls-client-ca.pem"


def write_whole(path: Path, data: bytes) -> None:
    """`path` holds `data` (owner-only), replaced by a rename: readers see the old or the new file."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


class DoorTls:
    """Keeps a checked copy of `live`'s files in `folder` (one only the coordinator can read);
    `files` names the copy, for the door's command line."""

    def __init__(self, live: ServerTls, folder: Path, every_s: float = RELOAD_CHECK_S):
        self.live = live
        self.every_s = every_s
        identity = str(folder / IDENTITY)
        self.files = ServerTls(identity, identity, str(folder / CLIENT_CA) if live.mutual else "")
        self._copies = Reloaded(f"TLS {live.cert_file} (front door)", live.files, self._copy, every_s)

    def _copy(self) -> None:
        """Read the live files, check them (ValueError, OSError) and write the copy."""
        key, cert = Path(self.live.key_file).read_bytes(), Path(self.live.cert_file).read_bytes()
        ca = Path(self.live.client_ca_file).read_bytes() if self.live.mutual else None
        check_key_pair(key, cert, ca)
        if ca is not None:
            write_whole(Path(self.files.client_ca_file), ca)
        write_whole(Path(self.files.cert_file), key.rstrip(b"\n") + b"\n" + cert)

    def refresh(self) -> None:
        """Copy the live files when they changed and load (at most once every `every_s`)."""
        self._copies.get()

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh the copy until `stop` is set."""
        while not stop.is_set():
            await asyncio.to_thread(self.refresh)
            try:
                await asyncio.wait_for(stop.wait(), self.every_s)
            except asyncio.TimeoutError:
                pass
