"""The front door's checked copy of the public port's TLS files: written when the live files load,
left as it was when they do not (the door keeps serving its last good certificate)."""
from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from services.common.tls import ServerTls
from services.coordinator.door_tls import DoorTls
from tests.pki import make_pki

HALF_WRITTEN = b"-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUYb\n"


@pytest.fixture
def pkis(tmp_path) -> tuple[dict, dict]:
    (tmp_path / "old").mkdir(), (tmp_path / "new").mkdir()
    return make_pki(tmp_path / "old"), make_pki(tmp_path / "new")


def _replace(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


@pytest.fixture
def live(tmp_path, pkis) -> ServerTls:
    """Live files holding the old PKI's certificate, key and CA."""
    old, _ = pkis
    files = ServerTls(str(tmp_path / "server.pem"), str(tmp_path / "server.key"), str(tmp_path / "ca.pem"))
    for path, entry in ((files.cert_file, "cert"), (files.key_file, "key"), (files.client_ca_file, "ca")):
        _replace(Path(path), Path(old[entry]).read_bytes())
    return files


def _copy(tmp_path, live: ServerTls) -> DoorTls:
    folder = tmp_path / "door"
    folder.mkdir(mode=0o700)
    return DoorTls(live, folder, every_s=0)


def _holds(door: DoorTls, pki: dict) -> bool:
    identity = Path(door.files.cert_file).read_bytes()
    return (Path(pki["key"]).read_bytes() in identity and Path(pki["cert"]).read_bytes() in identity
            and Path(door.files.client_ca_file).read_bytes() == Path(pki["ca"]).read_bytes())


def test_the_door_reads_its_key_and_certificate_from_one_file_only_the_coordinator_can_read(tmp_path, pkis, live):
    door = _copy(tmp_path, live)
    assert door.files.cert_file == door.files.key_file
    assert _holds(door, pkis[0])
    for path in (door.files.cert_file, door.files.client_ca_file):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_renewed_files_that_load_replace_the_copy(tmp_path, pkis, live):
    door = _copy(tmp_path, live)
    _, new = pkis
    for path, entry in ((live.cert_file, "cert"), (live.key_file, "key"), (live.client_ca_file, "ca")):
        _replace(Path(path), Path(new[entry]).read_bytes())
    door.refresh()
    assert _holds(door, new)


@pytest.mark.parametrize("which, broken", [
    ("cert_file", lambda pki: HALF_WRITTEN),
    ("key_file", lambda pki: Path(pki["client_key"]).read_bytes()),
    ("client_ca_file", lambda pki: HALF_WRITTEN),
], ids=["a half-written certificate", "a key not the certificate's", "a half-written client CA"])
def test_live_files_that_do_not_load_leave_the_last_good_copy_logged(tmp_path, pkis, live, which, broken, caplog):
    door = _copy(tmp_path, live)
    before = [Path(p).read_bytes() for p in door.files.files]
    _replace(Path(getattr(live, which)), broken(pkis[0]))
    with caplog.at_level(logging.WARNING):
        door.refresh()
    assert [Path(p).read_bytes() for p in door.files.files] == before
    assert "do not load" in caplog.text and "(front door)" in caplog.text


def test_a_copy_is_made_without_a_client_ca_when_clients_need_no_certificate(tmp_path, pkis, live):
    door = _copy(tmp_path, ServerTls(live.cert_file, live.key_file))
    assert door.files.client_ca_file == ""
    assert sorted(p.name for p in (tmp_path / "door").iterdir()) == ["tls-identity.pem"]
