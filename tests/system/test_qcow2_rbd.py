"""qcow2 set of a domain whose disk is a raw RBD disk: incs come from RBD diffs and are overlays;
every point's image is exact and the newest restores exactly onto a new RBD image (RBD target)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab.libvirt_lab import JOB_SAFE_KINDS, compare_images, random_writes
from tests.system.backup_helpers import backup
from tests.system.test_qcow2_set import image_info
from tests.system.test_rbd_backup import SIZE, RbdDomain, ceph_args, rbd_domain, rbd_export, restore

pytestmark = [pytest.mark.system, pytest.mark.ceph]
__all__ = ["rbd_domain"]          # the fixture, shared with test_rbd_backup


def test_qcow2_set_of_rbd_disk(rbd_domain: RbdDomain, tmp_path: Path) -> None:
    dom, c = rbd_domain.domain, rbd_domain.cluster
    disk = dom.disk("sda")
    folder = tmp_path / "backup"
    expected: dict[str, Path] = {}
    for step, level in enumerate(["full", "inc", "diff", "inc"]):
        disk.apply_all(random_writes(seed=60 + step, n=12, size=SIZE, kinds=JOB_SAFE_KINDS))
        res = backup(dom, level, folder, "-t", "qcow2", *ceph_args(c))
        assert res.rc == 0, res.stderr
        assert res.summary is not None
        expected[res.summary["point"]] = disk.snapshot(f"r{step}")
        assert "backed up whole" not in res.stderr
    names = list(expected)
    for point, image in expected.items():
        compare_images(folder / f"sda.{point}.qcow2", image, fmt="qcow2")
    for point, parent in ((names[1], names[0]), (names[2], names[1]), (names[3], names[1])):
        assert image_info(folder / f"sda.{point}.qcow2")["backing-filename"] == f"sda.{parent}.qcow2"
    last = list(expected)[-1]
    restore(folder, last, "--target", f"rbd:{c.pool}/{rbd_domain.image}-q", *ceph_args(c))
    try:
        compare_images(rbd_export(c, c.pool, f"{rbd_domain.image}-q", tmp_path / "q.raw"), expected[last], fmt="raw")
    finally:
        c.rbd("rm", "--no-progress", f"{c.pool}/{rbd_domain.image}-q")
