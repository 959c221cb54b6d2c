"""virtnbdrestore -o /dev/loopN (refused while mounted) and -o - (stdout): the raw disk, exact."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.libvirt_lab import DiskSpec, MiB, compare_images
from tests.system.backup_helpers import BACKUP, REPO

pytestmark = pytest.mark.system

RESTORE = str(REPO / "virtnbdrestore")
SIZE = 8 * MiB


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.write(b"\xaa" * SIZE)                 # not zeroed: zero ranges must be written
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True,
                         check=True).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["umount", dev], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", dev], check=False)


def test_restore_onto_loop_device_exact_and_refused_while_mounted(make_domain, loop_device: str,
                                                                  tmp_path: Path) -> None:
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    dom.disk("sda").write_data(MiB, 2 * MiB, seed=3)
    dom.disk("sda").write_zero(2 * MiB, MiB)
    expected = dom.disk("sda").snapshot("full")
    folder = tmp_path / "backup"
    proc = _run([sys.executable, BACKUP, "-d", dom.name, "-l", "full", "-o", str(folder), "-n",
                 "--scratchdir", str(dom.dir)])
    assert proc.returncode == 0, proc.stderr
    res = _run([sys.executable, RESTORE, "-i", str(folder), "-o", loop_device, "-n"])
    assert res.returncode == 0, res.stderr
    compare_images(loop_device, expected, fmt="raw")
    with open(tmp_path / "stdout.raw", "wb") as out:            # -o -: the raw image on stdout
        res = subprocess.run([sys.executable, RESTORE, "-i", str(folder), "-o", "-", "-n"], stdout=out,
                             stderr=subprocess.PIPE, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    compare_images(tmp_path / "stdout.raw", expected, fmt="raw")

    subprocess.run(["mkfs.ext4", "-q", "-F", loop_device], check=True, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", loop_device, str(mnt)], check=True)
    try:
        res = _run([sys.executable, RESTORE, "-i", str(folder), "-o", loop_device, "-n"])
        assert res.returncode == 1
        assert f"in use (mounted on {mnt})" in res.stderr and len(res.stderr.splitlines()) == 1, res.stderr
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    res = _run([sys.executable, RESTORE, "-i", str(folder), "-o", loop_device, "--format", "qcow2", "-n"])
    assert res.returncode == 1 and "writes a raw disk" in res.stderr
