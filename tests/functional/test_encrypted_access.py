"""Encrypted sets through virtnbdmap, virtnbdmount and virtnbdprune (consolidation and policies).

Proof by bytes: every point served over NBD (nbdcopy) or mounted equals the disk at that point; a
consolidated or pruned encrypted chain still has every kept point restore exact and verify with the
key, holds no plaintext, and its rewritten manifest carries the MAC (a tampered one is refused).
Secrets never reach argv: nbdkit's command line holds file names only.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.functional.restore_sets import compare
from tests.functional.retention_helpers import restore_all_exact, stored
from tests.functional.test_encrypted_sets import MARKER, _crypt, _MarkedSet, _no_marker, _secret_file
from tests.functional.test_map import Mapped, copy_and_compare
from tests.functional.test_mount_fs import mount
from virtnbd.backupset import manifest
from virtnbd.cli import prune as prune_cli
from virtnbd.cli import restore as restore_cli
from virtnbd.crypto import keyring
from virtnbd.crypto.keysource import KeySpec

ROOT = Path(__file__).resolve().parents[2]
PASSPHRASE = "correct horse battery staple 7"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyring.create, "__defaults__", (None, 1 << 10))
    for var in ("VIRTNBD_KEY_FILE", "VIRTNBD_PASSPHRASE", "VIRTNBD_NEW_KEY_FILE", "VIRTNBD_NEW_PASSPHRASE"):
        monkeypatch.delenv(var, raising=False)


def _chain(folder: Path, spec: KeySpec, incs: int, compression: str | None = "lz4") -> _MarkedSet:
    b = _MarkedSet(str(folder), size=2 << 20, compression=compression, seed=9, crypt=_crypt(str(folder), spec),
                   shadow_folder=str(folder.parent), name=f"vnbdencacc-{folder.name}")
    b.scribble(14)
    b.full()
    for _ in range(incs):
        b.scribble(5)
        b.inc()
    return b


def _digests(folder: str) -> dict[str, str]:
    """The set's own files (not the lock file and run logs a refused run may leave)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())
            if p.is_file() and not p.name.startswith((".", "prune."))}


def _run(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / tool), *args], check=False, capture_output=True, text=True,
                          timeout=120)


# -- virtnbdmap ---------------------------------------------------------------------------------------------

def test_map_serves_every_point_of_an_encrypted_set(tmp_path: Path) -> None:
    key_file = _secret_file(tmp_path, "key")
    b = _chain(tmp_path / "set", KeySpec(key_file=key_file), incs=3)
    for point in b.points:
        with Mapped(b.folder, "--until", point, "--key-file", key_file) as mapped:
            copy_and_compare(mapped, Path(b.shadow_path(point)), tmp_path)
            cmdline = Path(f"/proc/{mapped.info['pid']}/cmdline").read_bytes()
            assert f"key_file={key_file}".encode() in cmdline
            assert Path(key_file).read_bytes() not in cmdline
    missing = _run("virtnbdmap", "-i", b.folder, "--timeout", "1")
    assert missing.returncode == 1 and "the backup set is encrypted: give --key-file" in missing.stderr
    wrong = _run("virtnbdmap", "-i", b.folder, "--timeout", "1", "--key-file", _secret_file(tmp_path, "other"))
    assert wrong.returncode == 1 and "wrong key" in wrong.stderr


def test_map_takes_the_passphrase_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pw = _secret_file(tmp_path, "pw", PASSPHRASE)
    b = _chain(tmp_path / "set", KeySpec(passphrase_file=pw), incs=1, compression=None)
    monkeypatch.setenv("VIRTNBD_PASSPHRASE", PASSPHRASE)
    with Mapped(b.folder) as mapped:
        copy_and_compare(mapped, Path(b.shadow_path(b.points[-1])), tmp_path)
        cmdline = Path(f"/proc/{mapped.info['pid']}/cmdline").read_bytes()
        assert PASSPHRASE.encode() not in cmdline
    with Mapped(b.folder, "--until", b.points[0], "--passphrase-file", pw) as mapped:
        copy_and_compare(mapped, Path(b.shadow_path(b.points[0])), tmp_path)


def test_map_refuses_a_key_for_a_plain_set(tmp_path: Path) -> None:
    from tests.functional.restore_sets import SetBuilder
    b = SetBuilder(str(tmp_path / "plain"), size=1 << 20)
    b.scribble(4)
    b.full()
    done = _run("virtnbdmap", "-i", b.folder, "--timeout", "1", "--key-file", _secret_file(tmp_path, "key"))
    assert done.returncode == 1 and "not encrypted" in done.stderr


# -- virtnbdmount -------------------------------------------------------------------------------------------

def test_mount_shows_every_point_of_an_encrypted_set(tmp_path: Path) -> None:
    pw = _secret_file(tmp_path, "pw", PASSPHRASE)
    b = _chain(tmp_path / "set", KeySpec(passphrase_file=pw), incs=2)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    refused = _run("virtnbdmount", b.folder, str(mnt))
    assert refused.returncode == 1 and "encrypted" in refused.stderr and not os.path.ismount(mnt)
    proc = mount(b.folder, mnt, "--passphrase-file", pw)
    try:
        assert sorted(os.listdir(mnt)) == sorted(b.points)
        for point in b.points:
            compare(str(mnt / point / "sda.raw"), "raw", b.shadow_path(point))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert proc.wait(timeout=20) == 0


# -- virtnbdprune: consolidation and policies ------------------------------------------------------------

def _prune(*args: str) -> int:
    return prune_cli.main(list(args))


def test_consolidated_encrypted_chain_restores_exact_and_keeps_its_mac(tmp_path: Path) -> None:
    key_file = _secret_file(tmp_path, "key")
    b = _chain(tmp_path / "set", KeySpec(key_file=key_file), incs=6)
    shadows = {p: b.shadow_path(p) for p in b.points}
    before_files, before_size = _digests(b.folder), stored(b.folder)
    assert _prune("-i", b.folder, "--consolidate", "virtnbdbackup.3") == 1            # no key: nothing changes
    assert _digests(b.folder) == before_files
    assert _prune("-i", b.folder, "--consolidate", "virtnbdbackup.3", "--key-file", key_file) == 0
    listed = restore_all_exact(b.folder, shadows, "--key-file", key_file)
    assert listed == [f"virtnbdbackup.{i}" for i in range(3, 7)]
    assert stored(b.folder) < before_size
    assert "auth" in json.loads(Path(b.folder, "virtnbd.manifest.json").read_text())
    _no_marker(b.folder)
    b.scribble(4)
    b.inc()                                                   # the next inc continues the encrypted chain
    shadows[b.points[-1]] = b.shadow_path(b.points[-1])
    restore_all_exact(b.folder, shadows, "--key-file", key_file)


def _tamper(folder: str) -> None:
    """Change one point's time in the manifest and leave its MAC as it was."""
    path = Path(folder, "virtnbd.manifest.json")
    doc = json.loads(path.read_text())
    doc["points"][-1]["time"] = "2020-01-01T00:00:00+00:00"
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def test_pruned_encrypted_chain_is_exact_and_a_tampered_rewrite_is_refused(tmp_path: Path,
                                                                            capfd: pytest.CaptureFixture[str]
                                                                            ) -> None:
    key_file = _secret_file(tmp_path, "key")
    b = _chain(tmp_path / "set", KeySpec(key_file=key_file), incs=5)
    shadows = {p: b.shadow_path(p) for p in b.points}
    untouched = _digests(b.folder)
    assert _prune("-i", b.folder, "--keep-last", "2", "--merge") == 1                # no key: nothing changes
    assert "the backup set is encrypted" in capfd.readouterr().err
    assert _digests(b.folder) == untouched
    assert _prune("-i", b.folder, "--keep-last", "2", "--merge", "--key-file", key_file) == 0
    assert restore_all_exact(b.folder, shadows, "--key-file", key_file) == ["virtnbdbackup.4", "virtnbdbackup.5"]
    _no_marker(b.folder)
    _tamper(b.folder)
    kept = _digests(b.folder)
    out = tmp_path / "out"
    assert restore_cli.main(["-i", b.folder, "-o", str(out), "-n", "--format", "raw", "--key-file", key_file]) == 1
    assert restore_cli.main(["-i", b.folder, "-a", "verify", "-n", "--key-file", key_file]) == 1
    assert _prune("-i", b.folder, "--keep-last", "1", "--key-file", key_file) == 1
    assert "manifest does not authenticate" in capfd.readouterr().err
    assert _digests(b.folder) == kept
    m = manifest.load(b.folder)
    assert m is not None and len(m.points) == 2
    assert MARKER not in Path(b.folder, "virtnbd.manifest.json").read_bytes()
