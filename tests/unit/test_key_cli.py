"""virtnbdkey: key files and key slots through the command line (only the slot file changes)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from virtnbd.cli import key as keycli
from virtnbd.crypto import keyring, store
from virtnbd.crypto.keysource import KeySpec


@pytest.fixture(autouse=True)
def fast_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyring, "SCRYPT_N", 1 << 10)
    monkeypatch.setattr(keyring.add_slot, "__defaults__", (1 << 10,))
    monkeypatch.setattr(keyring.create, "__defaults__", (None, 1 << 10))
    for var in ("VIRTNBD_KEY_FILE", "VIRTNBD_PASSPHRASE", "VIRTNBD_NEW_KEY_FILE", "VIRTNBD_NEW_PASSPHRASE"):
        monkeypatch.delenv(var, raising=False)


def _pass(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
            if p.name != store.KEYS and not p.name.startswith(".")}


def test_key_lifecycle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_file = str(tmp_path / "key")
    assert keycli.main(["create-keyfile", key_file]) == 0
    assert os.stat(key_file).st_mode & 0o777 == 0o600 and os.path.getsize(key_file) == 32
    assert keycli.main(["create-keyfile", key_file]) == 1           # never overwrites
    folder = tmp_path / "set"
    folder.mkdir()
    made = store.new_key(KeySpec(key_file=key_file))
    assert made is not None
    store.save_ring(folder, made[0])
    (folder / "sda.full.data").write_bytes(b"data stays as it is")
    before = _digests(folder)
    old, new = _pass(tmp_path, "old", "old secret"), _pass(tmp_path, "new", "new secret")
    assert keycli.main(["add", "-i", str(folder), "--key-file", key_file, "--new-passphrase-file", old]) == 0
    assert keycli.main(["passwd", "-i", str(folder), "--passphrase-file", old, "--new-passphrase-file", new]) == 0
    assert keycli.main(["list", "-i", str(folder), "--passphrase-file", old]) == 0   # list needs no key
    out = capsys.readouterr().out
    assert made[1].fingerprint in out and out.count("passphrase") >= 1
    assert keycli.main(["list", "-i", str(folder), "--passphrase-file", old]) == 0
    assert store.open_key(folder, KeySpec(passphrase_file=new)) == made[1]
    assert keycli.main(["add", "-i", str(folder), "--passphrase-file", old, "--new-key-file", key_file]) == 1
    ring = store.load_ring(folder)
    assert ring is not None and len(ring.slots) == 2
    keyfile_slot = next(s.id for s in ring.slots if s.kind == "keyfile")
    assert keycli.main(["remove", "-i", str(folder), "--passphrase-file", new, "--slot", keyfile_slot]) == 0
    assert keycli.main(["remove", "-i", str(folder), "--passphrase-file", new,
                        "--slot", store.load_ring(folder).slots[0].id]) == 1      # last slot stays  # type: ignore[union-attr]
    with pytest.raises(Exception, match="no keyfile key slot"):
        store.open_key(folder, KeySpec(key_file=key_file))
    assert _digests(folder) == before


def test_usage_errors(tmp_path: Path) -> None:
    assert keycli.main(["create-keyfile"]) == 1
    assert keycli.main(["list"]) == 1
    assert keycli.main(["remove", "-i", str(tmp_path)]) == 1
    assert keycli.main(["list", "-i", str(tmp_path)]) == 1                     # not encrypted
    assert keycli.main(["add", "-i", str(tmp_path / "missing")]) == 1
