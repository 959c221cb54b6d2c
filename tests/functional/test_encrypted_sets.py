"""Encrypted backup sets end to end through virtnbdrestore / virtnbdkey (sets written with the real writer).

Proof by bytes: every point restores identical to its shadow image; single-byte flips anywhere
(frames, headers, index, manifest, side files) are detected by verify with the key and by restore;
frames moved between points and sets are detected; key rotation leaves data files untouched.
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from tests.functional.restore_sets import SetBuilder, compare
from virtnbd.backupset import encrypted
from virtnbd.backupset.api import create_set
from virtnbd.backupset.sealed import EncryptedSet
from virtnbd.cli import key as key_cli
from virtnbd.cli import restore as restore_cli
from virtnbd.crypto import keyring, keysource, store
from virtnbd.crypto.keysource import KeySpec
from virtnbd.stream import format as fmt

MARKER = b"VNBD-SECRET-MARKER-0123456789abcdef"


@pytest.fixture(autouse=True)
def _fast_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyring.add_slot, "__defaults__", (1 << 10,))
    monkeypatch.setattr(keyring.create, "__defaults__", (None, 1 << 10))
    for var in ("VIRTNBD_KEY_FILE", "VIRTNBD_PASSPHRASE", "VIRTNBD_NEW_KEY_FILE", "VIRTNBD_NEW_PASSPHRASE"):
        monkeypatch.delenv(var, raising=False)


def _secret_file(tmp_path: Path, name: str, text: str | None = None) -> str:
    path = tmp_path / name
    if text is None:
        keysource.create_key_file(str(path))
    else:
        path.write_text(text + "\n")
        path.chmod(0o600)
    return str(path)


def _crypt(folder: str, spec: KeySpec) -> EncryptedSet:
    bset = encrypted.for_backup(create_set(folder), spec, None, "full")
    assert isinstance(bset, EncryptedSet)
    return bset


class _MarkedSet(SetBuilder):
    def scribble(self, n: int, zero_share: float = 0.2) -> None:
        super().scribble(n, zero_share)
        c = self.rng.randrange(self.size // self.cluster)      # one cluster of marker text per point
        self.shadow[c * self.cluster:(c + 1) * self.cluster] = (MARKER * (self.cluster // len(MARKER) + 1))[
            :self.cluster]
        self.allocated.add(c)
        self.dirty.add(c)


def _build(tmp_path: Path, compression: str | None, key_file: str, name: str = "set", seed: int = 3) -> _MarkedSet:
    b = _MarkedSet(str(tmp_path / name), size=2 << 20, compression=compression, seed=seed,
                   crypt=_crypt(str(tmp_path / name), KeySpec(key_file=key_file)), shadow_folder=str(tmp_path),
                   name=f"vnbdenc-{name}")
    b.scribble(12)
    b.full()
    for _ in range(3):
        b.scribble(6)
        b.inc()
    return b


def _restore(folder: str, out: Path, point: str, *key: str) -> int:
    return restore_cli.main(["-i", folder, "-o", str(out), "--until", point, "-n", "--format", "raw", *key])


def _verify(folder: str, *key: str) -> int:
    return restore_cli.main(["-i", folder, "-a", "verify", "-n", *key])


def _no_marker(folder: str) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            data = Path(root, name).read_bytes()
            assert MARKER not in data and MARKER[:16] not in data, f"plaintext marker in {name}"


@pytest.mark.parametrize("compression", [None, "lz4"])
def test_every_point_restores_exactly_and_no_plaintext(tmp_path: Path, compression: str | None) -> None:
    key_file = _secret_file(tmp_path, "key")
    b = _build(tmp_path, compression, key_file)
    _no_marker(b.folder)
    assert b"guest-" not in Path(b.folder, "virtnbd.manifest.json").read_bytes()
    for point in b.points:
        out = tmp_path / f"out-{point}"
        assert _restore(b.folder, out, point, "--key-file", key_file) == 0
        compare(str(out / "sda.raw"), "raw", b.shadow_path(point))
    assert _verify(b.folder, "--key-file", key_file) == 0


def test_missing_and_wrong_key_one_error_nothing_written(tmp_path: Path,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    b = _build(tmp_path, None, _secret_file(tmp_path, "key"))
    other = _secret_file(tmp_path, "other")
    for args in ([], ["--key-file", other], ["--passphrase-file", _secret_file(tmp_path, "pw", "x")]):
        out = tmp_path / "out"
        assert _restore(b.folder, out, b.points[-1], *args) == 1
        assert not out.exists() or not any(out.iterdir())
    loose = tmp_path / "loose"
    loose.write_bytes(os.urandom(32))
    loose.chmod(0o644)
    assert _restore(b.folder, tmp_path / "out", b.points[-1], "--key-file", str(loose)) == 1
    err = capfd.readouterr().err
    for text in ("the backup set is encrypted: give --key-file", "wrong key", "no passphrase key slot",
                 "readable by group or others"):
        assert text in err


def test_verify_without_key_checks_structure(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    b = _build(tmp_path, "lz4", _secret_file(tmp_path, "key"))
    assert _verify(b.folder) == 0
    assert "could NOT be authenticated" in capfd.readouterr().err
    stream = Path(b.folder, "sda.inc.virtnbdbackup.2.data")
    raw = bytearray(stream.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    stream.write_bytes(bytes(raw))
    assert _verify(b.folder) == 1


def _data_files(folder: str) -> list[Path]:
    return sorted(Path(folder).glob("*.data"))


def _regions(folder: str) -> list[tuple[Path, int]]:
    """Targets for flips: frame headers, payloads, index, footer, stream headers, manifest, side files."""
    spots: list[tuple[Path, int]] = []
    rng = random.Random(11)
    for path in _data_files(folder):
        raw = path.read_bytes()
        size = len(raw)
        end_pos, index_pos = fmt.FOOTER.unpack(raw[-fmt.FOOTER.size:])[:2]
        spots += [(path, rng.randrange(0, 200)), (path, rng.randrange(200, end_pos)),
                  (path, rng.randrange(end_pos, index_pos)), (path, rng.randrange(index_pos, size))]
    manifest = Path(folder, "virtnbd.manifest.json")
    spots += [(manifest, rng.randrange(manifest.stat().st_size)) for _ in range(8)]
    side = sorted(Path(folder).glob("vmconfig.*.xml"))[0]
    spots += [(side, rng.randrange(side.stat().st_size)) for _ in range(6)]
    return spots


def test_thirty_flips_each_detected_by_verify_and_restore(tmp_path: Path) -> None:
    key_file = _secret_file(tmp_path, "key")
    b = _build(tmp_path, "lz4", key_file)
    spots = _regions(b.folder)
    assert len(spots) >= 30
    rng = random.Random(5)
    for path, pos in spots[:30]:
        original = path.read_bytes()
        flipped = bytearray(original)
        flipped[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(flipped))
        try:
            assert _verify(b.folder, "--key-file", key_file) == 1, f"verify missed flip at {path.name}:{pos}"
            out = tmp_path / "out"
            rc = _restore(b.folder, out, b.points[-1], "--key-file", key_file, "-c")
            assert rc == 1, f"restore missed flip at {path.name}:{pos}"
        finally:
            path.write_bytes(original)
    assert _verify(b.folder, "--key-file", key_file) == 0


def _frame_spans(path: Path) -> list[tuple[int, int, int]]:
    """(offset, position, size) of every data frame (header + payload)."""
    raw = path.read_bytes()
    spans = []
    end_pos, index_pos, count = fmt.FOOTER.unpack(raw[-fmt.FOOTER.size:])[:3]
    for kind, offset, _length, pos in fmt.INDEX_ENTRY.iter_unpack(raw[index_pos:index_pos + 32 * count]):
        if kind == fmt.KIND_DATA:
            stored = fmt.FRAME.unpack(raw[pos:pos + fmt.FRAME.size])[5]
            spans.append((offset, pos, fmt.FRAME.size + stored))
    return spans


def _transplant(dst: Path, src: Path) -> bool:
    """Put a data frame of ``src`` in place of a ``dst`` frame of the same disk offset and size."""
    theirs = {(o, n): p for o, p, n in _frame_spans(src)}
    for offset, pos, size in _frame_spans(dst):
        if (offset, size) in theirs:
            raw = bytearray(dst.read_bytes())
            start = theirs[(offset, size)]
            raw[pos:pos + size] = src.read_bytes()[start:start + size]
            dst.write_bytes(bytes(raw))
            return True
    return False


def test_frames_moved_between_points_and_sets_detected(tmp_path: Path) -> None:
    key_file = _secret_file(tmp_path, "key")
    b = _build(tmp_path, None, key_file)
    full, inc1 = Path(b.folder, "sda.full.data"), Path(b.folder, "sda.inc.virtnbdbackup.1.data")
    original = inc1.read_bytes()
    assert _transplant(inc1, full)
    assert _verify(b.folder, "--key-file", key_file) == 1
    assert _restore(b.folder, tmp_path / "o1", b.points[1], "--key-file", key_file) == 1
    inc1.write_bytes(original)
    # another set opened by the same key file: its own master key, set id and salts
    other = _build(tmp_path, None, key_file, name="other", seed=3)
    assert _transplant(full, Path(other.folder, "sda.full.data"))
    assert _verify(b.folder, "--key-file", key_file) == 1
    assert _restore(b.folder, tmp_path / "o2", b.points[0], "--key-file", key_file) == 1


def _digests(folder: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).iterdir()
            if p.is_file() and p.name != store.KEYS and not p.name.startswith(".")}


def test_passphrase_change_and_slot_removal(tmp_path: Path) -> None:
    key_file = _secret_file(tmp_path, "key")
    b = _build(tmp_path, "lz4", key_file)
    before = _digests(b.folder)
    old, new = _secret_file(tmp_path, "old", "old pass"), _secret_file(tmp_path, "new", "new pass")
    assert key_cli.main(["add", "-i", b.folder, "--key-file", key_file, "--new-passphrase-file", old]) == 0
    assert _restore(b.folder, tmp_path / "o0", b.points[-1], "--passphrase-file", old) == 0
    assert key_cli.main(["passwd", "-i", b.folder, "--passphrase-file", old, "--new-passphrase-file", new]) == 0
    assert _restore(b.folder, tmp_path / "o1", b.points[-1], "--passphrase-file", old) == 1
    ring = store.load_ring(b.folder)
    assert ring is not None
    keyfile_slot = next(s.id for s in ring.slots if s.kind == "keyfile")
    assert key_cli.main(["remove", "-i", b.folder, "--passphrase-file", new, "--slot", keyfile_slot]) == 0
    assert _restore(b.folder, tmp_path / "o2", b.points[-1], "--key-file", key_file) == 1
    assert _restore(b.folder, tmp_path / "o3", b.points[-1], "--passphrase-file", new) == 0
    compare(str(tmp_path / "o3" / "sda.raw"), "raw", b.shadow_path(b.points[-1]))
    assert _digests(b.folder) == before
