"""Backups of a shut-off domain (qemu-nbd export of the images) that online incs continue exactly."""
from __future__ import annotations

import pytest

from tests.lab.libvirt_lab import DiskSpec, MiB
from tests.system.backup_helpers import check_point, ok
from tests.system.chain_helpers import check_restored, checkpoint_names, manifest_points, snap_all, write_all

pytestmark = pytest.mark.system

SIZE = 16 * MiB
OFFLINE_KINDS = ("data", "data", "pattern", "zero", "discard")


def _write_all(dom, seed: int) -> None:  # type: ignore[no-untyped-def]
    write_all(dom, seed, 8, OFFLINE_KINDS)



def test_offline_inc_between_online_incs(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE), DiskSpec("sdb", "sata", "raw", SIZE)])
    sda = dom.disk("sda")
    folder = dom.dir / "backup"
    expected = {}
    _write_all(dom, 1)
    assert ok(dom, "full", folder)["point"] == "virtnbdbackup.0"
    expected["virtnbdbackup.0"] = snap_all(dom, "p0")
    _write_all(dom, 2)
    assert ok(dom, "inc", folder)["point"] == "virtnbdbackup.1"
    expected["virtnbdbackup.1"] = snap_all(dom, "p1")

    dom.stop()
    _write_all(dom, 3)                                   # written while off (qemu-io on the image)
    estimate = ok(dom, "inc", folder, "-p")              # -p offline: measured from the exported bitmap
    assert estimate["skipped"] and estimate["estimate"]["sdb"] > 0
    summary = ok(dom, "inc", folder)
    assert 0 < summary["disks"]["sda"]["bytes_read"] <= estimate["estimate"]["sda"]
    assert summary["point"] == "virtnbdbackup.2" and summary["consistency"] == "offline"
    expected["virtnbdbackup.2"] = snap_all(dom, "p2")
    # the offline point left the chain as an online one would: metadata + an enabled bitmap per qcow2 disk
    assert checkpoint_names(dom) == ["virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2"]
    assert sorted(sda.bitmaps()) == ["virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2"]
    # it read only what changed on the qcow2 disk, the raw disk whole
    assert summary["disks"]["sda"]["bytes_read"] < SIZE // 2

    _write_all(dom, 4)
    summary = ok(dom, "diff", dom.dir / "backup")      # an offline diff too
    expected[summary["point"]] = snap_all(dom, "p2d")
    dom.start()
    _write_all(dom, 5)
    assert ok(dom, "inc", folder)["point"] == "virtnbdbackup.3"      # online again, continues the chain
    expected["virtnbdbackup.3"] = snap_all(dom, "p3")
    _write_all(dom, 6)
    assert ok(dom, "inc", folder)["point"] == "virtnbdbackup.4"
    expected["virtnbdbackup.4"] = snap_all(dom, "p4")

    levels = {p["name"]: (p["level"], p["consistency"]) for p in manifest_points(folder)}
    assert [v[1] == "offline" for v in levels.values()] == [False, False, True, True, False, False]
    for point, images in expected.items():
        check_point(dom, folder, point, images, tmp_path)
    check_restored(folder, "virtnbdbackup.2", expected["virtnbdbackup.2"], tmp_path)
    check_restored(folder, "virtnbdbackup.4", expected["virtnbdbackup.4"], tmp_path)


def test_offline_full_starts_a_chain_the_online_inc_continues(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    sda = dom.disk("sda")
    old, new = dom.dir / "old-chain", dom.dir / "new-chain"
    _write_all(dom, 11)
    ok(dom, "full", old)
    _write_all(dom, 12)
    ok(dom, "inc", old)
    dom.stop()
    _write_all(dom, 13)
    copy = ok(dom, "copy", dom.dir / "copy")
    assert copy["consistency"] == "offline"
    summary = ok(dom, "auto", new)                        # empty folder: a full, offline
    assert summary["point"] == "virtnbdbackup.0" and summary["level"] == "full"
    expected = {"virtnbdbackup.0": snap_all(dom, "n0")}
    # the old chain's checkpoints and bitmaps are gone, the new chain's are there
    assert checkpoint_names(dom) == ["virtnbdbackup.0"]
    assert sda.bitmaps() == ["virtnbdbackup.0"]
    dom.start()
    _write_all(dom, 14)
    assert ok(dom, "auto", new)["point"] == "virtnbdbackup.1"
    expected["virtnbdbackup.1"] = snap_all(dom, "n1")
    for point, images in expected.items():
        check_point(dom, new, point, images, tmp_path)
    check_point(dom, dom.dir / "copy", "copy", expected["virtnbdbackup.0"], tmp_path)



def test_disk_added_while_off_then_online_inc(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    folder = dom.dir / "backup"
    _write_all(dom, 21)
    ok(dom, "full", folder)
    expected = {"virtnbdbackup.0": snap_all(dom, "a0")}
    dom.stop()
    sdb = dom.attach_disk(DiskSpec("sdb", "sata", "qcow2", SIZE))       # config only: the domain is off
    _write_all(dom, 22)
    summary = ok(dom, "inc", folder)
    expected["virtnbdbackup.1"] = snap_all(dom, "a1")
    assert manifest_points(folder)[1]["disks"]["sdb"]["extra"]["mode"] == "full"
    assert sdb.bitmaps() == ["virtnbdbackup.1"] and summary["consistency"] == "offline"
    dom.start()
    _write_all(dom, 23)
    ok(dom, "inc", folder)
    expected["virtnbdbackup.2"] = snap_all(dom, "a2")
    assert manifest_points(folder)[2]["disks"]["sdb"]["extra"]["mode"] == "inc"
    for point, images in expected.items():
        check_point(dom, folder, point, images, tmp_path)
    check_restored(folder, "virtnbdbackup.2", expected["virtnbdbackup.2"], tmp_path)


def test_raw_only_never_started_domain_keeps_a_chain(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A defined, never-booted domain with raw disks only: its full starts a chain (point virtnbdbackup.0,
    no libvirt checkpoint: raw images carry no bitmap) that offline and online incs continue exactly,
    every disk copied whole. Before the fix the full was named ``full`` and the next inc failed."""
    dom = make_domain(disks=[DiskSpec("sda", "sata", "raw", SIZE)], start=False)
    folder = dom.dir / "backup"
    _write_all(dom, 21)
    full = ok(dom, "auto", folder)
    assert (full["point"], full["level"], full["consistency"]) == ("virtnbdbackup.0", "full", "offline")
    expected = {"virtnbdbackup.0": snap_all(dom, "r0")}
    _write_all(dom, 22)
    assert ok(dom, "auto", folder)["point"] == "virtnbdbackup.1"             # offline inc: whole copy
    expected["virtnbdbackup.1"] = snap_all(dom, "r1")
    dom.start()
    _write_all(dom, 23)
    online = ok(dom, "inc", folder)
    assert online["point"] == "virtnbdbackup.2" and online["disks"]["sda"]["bytes_read"] > 0
    expected["virtnbdbackup.2"] = snap_all(dom, "r2")
    assert checkpoint_names(dom) == []                   # nothing in libvirt: raw disks carry no bitmap
    assert [p["checkpoint"] for p in manifest_points(folder)] == list(expected)
    for point, images in expected.items():
        check_point(dom, folder, point, images, tmp_path)
