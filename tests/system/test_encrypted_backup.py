"""Encrypted backups of a real running domain (libvirtd + QEMU): full + 3 incs, plain and lz4.

Proof by bytes: every point restores identical to the shadow image of the guest disk at that
point (qemu-img compare), and a marker text written into the guest disk never appears in any
byte under the backup folder (a plain backup of the same disk is the control: there it does).
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lab.diskops import Op
from tests.lab.libvirt_lab import DiskSpec, MiB, compare_images, random_writes
from tests.system.backup_helpers import REPO, backup, ok

pytestmark = pytest.mark.system

SIZE = 16 * MiB
MARKER = b"VNBD-GUEST-MARKER-7f3a9c1e-"


@dataclass(frozen=True)
class MarkerOp(Op):
    """A data write whose bytes are the marker text repeated (what the grep looks for)."""

    def data(self) -> bytes:
        return (MARKER * (self.length // len(MARKER) + 1))[:self.length]


def _marker_ops(seed: int) -> list[Op]:
    rng = random.Random(seed)
    return [MarkerOp("data", rng.randrange(SIZE // (64 << 10)) * (64 << 10), 64 << 10) for _ in range(3)]


def _key_file(folder: Path, name: str = "key") -> str:
    path = folder / name
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return str(path)


def _restore(folder: Path, point: str, out: Path, *key: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(REPO / "virtnbdrestore"), "-n", "-i", str(folder), "-o", str(out), "--until", point,
           "--format", "raw", *key]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, check=False)


def _holds_marker(folder: Path) -> list[str]:
    found = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            data = Path(root, name).read_bytes()
            if MARKER in data or MARKER[:12] in data:
                found.append(name)
    return found


@pytest.mark.parametrize("compress", [(), ("-z",)], ids=["plain", "lz4"])
def test_encrypted_chain_exact_and_no_plaintext(make_domain, tmp_path, compress) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    disk = dom.disk("sda")
    key = _key_file(tmp_path)
    folder = dom.dir / "backup"
    expected = {}
    for step in range(4):
        disk.apply_all(random_writes(seed=40 + step, n=10, size=SIZE))
        disk.apply_all(_marker_ops(step))
        summary = ok(dom, "full" if step == 0 else "inc", folder, "--key-file", key, *compress)
        expected[summary["point"]] = disk.snapshot(f"enc{step}")
    assert (folder / "virtnbd.keys.json").is_file()
    assert _holds_marker(folder) == []
    for point, image in expected.items():
        out = tmp_path / f"out-{point}"
        res = _restore(folder, point, out, "--key-file", key)
        assert res.returncode == 0, res.stderr
        compare_images(out / "sda.raw", image, fmt="raw")
    # an inc with another key, or without one, is refused before anything is written
    before = sorted(p.name for p in folder.iterdir())
    other = backup(dom, "inc", folder, "--key-file", _key_file(tmp_path, "other"))
    assert other.rc == 1 and "wrong key" in other.stderr
    missing = backup(dom, "inc", folder)
    assert missing.rc == 1 and "encrypted" in missing.stderr
    assert sorted(p.name for p in folder.iterdir()) == before
    # control: the same guest disk backed up without a key shows the marker, so the grep can fail
    plain = dom.dir / "plain"
    ok(dom, "copy", plain, *compress)
    assert _holds_marker(plain)
