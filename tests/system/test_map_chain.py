"""virtnbdmap on a real chain: a running domain backed up full + 5 incs with lz4; every point served,
nbdcopy of the export compares identical to the disk as it was at that point, and 20 random reads crossing
frame and point boundaries equal it."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.functional.test_map import Mapped, copy_and_compare, random_reads
from tests.lab.libvirt_lab import DiskSpec, MiB
from tests.system.backup_helpers import ok
from tests.system.chain_helpers import snap_all, write_all

pytestmark = pytest.mark.system

KINDS = ("data", "data", "pattern", "zero", "discard")


def test_every_point_of_a_real_lz4_chain(make_domain, tmp_path):
    dom = make_domain(disks=[DiskSpec("sda", "virtio", "qcow2", 16 * MiB)])
    folder = dom.dir / "backup"
    expected: dict[str, Path] = {}
    for n in range(6):
        write_all(dom, n + 1, 8, KINDS)
        point = ok(dom, "full" if n == 0 else "inc", folder, "-z")["point"]
        expected[point] = snap_all(dom, f"p{n}")["sda"]
    assert len(expected) == 6
    for n, (point, image) in enumerate(expected.items()):
        with Mapped(folder, "--until", point) as mapped:
            copy_and_compare(mapped, image, tmp_path)
            random_reads(mapped, image.read_bytes(), n)
