"""virtnbdmap and virtnbdmount on a qcow2 set (real qemu-img / qemu-nbd, no libvirt), and virtnbdmount of a
two-disk set: every point, every disk compares identical (``qemu-img compare``) to that disk at that point.

The qcow2 set: full + 2 incs of one 8 MiB disk, the incs overwriting, zeroing (a zero cluster hiding its
backing) and adding data; the reference of a point is ``qemu-img convert`` of its image with its backing chain.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.functional.restore_sets import compare
from tests.functional.test_map import Mapped, copy_and_compare, random_reads
from tests.functional.test_mount_fs import mount
from tests.functional.test_qcow2_set_images import _add
from tests.functional.test_restore_legacy import _build as build_legacy
from virtnbd.backupset.api import create_set

MiB = 1 << 20
POINTS = ("virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2")


@pytest.fixture(scope="module")
def qcow2_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """The set's folder and, per point, the disk at that point as a raw file."""
    base = tmp_path_factory.mktemp("qcow2access")
    folder = base / "set"
    bset = create_set(str(folder), "qcow2")
    ones, twos, threes = b"\x01" * MiB, b"\x02" * (64 << 10), bytes(range(256)) * (3 * MiB // 256)
    _add(bset, POINTS[0], "full", None, [(0, ones, MiB), (4 * MiB, ones, MiB), (7 * MiB, twos, 64 << 10)])
    _add(bset, POINTS[1], "inc", POINTS[0], [(0, None, 64 << 10), (2 * MiB, twos, 64 << 10),
                                             (4 * MiB + 4096, twos, 64 << 10)])
    _add(bset, POINTS[2], "inc", POINTS[1], [(MiB - 4096, threes, 3 * MiB), (7 * MiB, None, 64 << 10)])
    refs = {}
    for point in POINTS:
        refs[point] = base / f"{point}.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(folder / f"sda.{point}.qcow2"),
                        str(refs[point])], check=True)
    return folder, refs


def test_map_serves_every_point_of_a_qcow2_set(qcow2_set: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    folder, refs = qcow2_set
    for n, point in enumerate(POINTS):
        with Mapped(folder, "--until", point) as mapped:
            copy_and_compare(mapped, refs[point], tmp_path)
            random_reads(mapped, refs[point].read_bytes(), n)


def test_mount_shows_every_point_of_a_qcow2_set(qcow2_set: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    folder, refs = qcow2_set
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = mount(str(folder), mnt)
    try:
        assert sorted(p.name for p in mnt.iterdir()) == list(POINTS)
        for point in POINTS:
            assert [p.name for p in (mnt / point).iterdir()] == ["sda.raw"]
            compare(str(mnt / point / "sda.raw"), "raw", str(refs[point]))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert proc.wait(timeout=20) == 0


def test_mount_shows_both_disks_of_a_two_disk_set(tmp_path: Path) -> None:
    folder = tmp_path / "legacy"
    expected, names = build_legacy(folder, True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = mount(str(folder), mnt)
    try:
        for point in names:
            assert sorted(p.name for p in (mnt / point).iterdir()) == [f"{d}.raw" for d in sorted(expected[point])]
            for disk, want in expected[point].items():
                assert (mnt / point / f"{disk}.raw").read_bytes() == want, (point, disk)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert proc.wait(timeout=20) == 0
