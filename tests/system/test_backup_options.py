"""Raw disks at inc, include/exclude, --printonly, --threshold, the folder lock, compression."""
from __future__ import annotations

import fcntl
import json
import os

import pytest

from tests.lab.libvirt_lab import DiskSpec, MiB, random_writes
from tests.system.backup_helpers import backup, check_point, must_read_blocks, ok

pytestmark = pytest.mark.system

SIZE = 16 * MiB


def _points(folder) -> list[str]:  # type: ignore[no-untyped-def]
    return [p["name"] for p in json.loads((folder / "virtnbd.manifest.json").read_text())["points"]]


def test_raw_disk_is_copied_whole_at_every_inc(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE), DiskSpec("sdb", "sata", "raw", SIZE)])
    folder = dom.dir / "backup"
    expected = {}
    for n, target in enumerate(("sda", "sdb")):
        dom.disk(target).apply_all(random_writes(seed=n, n=10, size=SIZE))
    ok(dom, "full", folder, "-z")
    expected["virtnbdbackup.0"] = {t: dom.disk(t).snapshot("p0") for t in ("sda", "sdb")}
    ops = random_writes(seed=5, n=10, size=SIZE)
    dom.disk("sda").apply_all(ops)
    dom.disk("sdb").apply_all(random_writes(seed=6, n=10, size=SIZE))
    res = backup(dom, "inc", folder, "-z", "--compress-method", "zstd")
    assert res.rc == 0, res.stderr
    assert "sdb: backed up whole in this inc: raw disks have no dirty bitmap" in res.stderr
    summary = res.summary
    assert summary is not None
    assert summary["disks"]["sda"]["bytes_read"] == must_read_blocks(ops)
    sdb = summary["disks"]["sdb"]
    assert sdb["data_bytes"] + sdb["zero_bytes"] == SIZE          # the whole raw disk is described
    expected["virtnbdbackup.1"] = {t: dom.disk(t).snapshot("p1") for t in ("sda", "sdb")}
    checkpoint = dom.dom.checkpointLookupByName("virtnbdbackup.1").getXMLDesc(0)
    assert "name='sdb' checkpoint='no'" in checkpoint.replace('"', "'")
    for point, images in expected.items():
        check_point(dom, folder, point, images, tmp_path)


def test_include_exclude_printonly_threshold_lock(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE), DiskSpec("sdb", "sata", "qcow2", SIZE)])
    folder = dom.dir / "backup"
    dom.disk("sda").write_data(0, 2 * MiB, seed=1)
    summary = ok(dom, "full", folder, "-x", "sdb")
    assert list(summary["disks"]) == ["sda"]
    expected = {"virtnbdbackup.0": {"sda": dom.disk("sda").snapshot("p0")}}

    dom.disk("sda").write_data(4 * MiB, 1 * MiB, seed=2)
    # --printonly: an estimate from the checkpoint, nothing written
    summary = ok(dom, "inc", folder, "-x", "sdb", "--printonly")
    assert summary["skipped"] and summary["estimate"]["sda"] >= 1 * MiB
    assert _points(folder) == ["virtnbdbackup.0"]
    # --threshold above the change: skipped, exit 0, nothing committed, no checkpoint made
    summary = ok(dom, "inc", folder, "-x", "sdb", "-T", "64M")
    assert summary["skipped"] and summary["reason"] == "below threshold"
    assert _points(folder) == ["virtnbdbackup.0"]
    assert [c.getName() for c in dom.dom.listAllCheckpoints()] == ["virtnbdbackup.0"]
    # a second run while the folder is locked is refused
    fd = os.open(folder / ".virtnbdbackup.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = backup(dom, "inc", folder, "-x", "sdb")
        assert res.rc == 1 and "locked by running process" in res.stderr
    finally:
        os.close(fd)
    # below the threshold's size: runs
    summary = ok(dom, "inc", folder, "-i", "sda", "-T", "512K")
    assert summary["point"] == "virtnbdbackup.1"
    expected["virtnbdbackup.1"] = {"sda": dom.disk("sda").snapshot("p1")}
    for point, images in expected.items():
        check_point(dom, folder, point, images, tmp_path)
