"""Chains that libvirt or an admin broke: lost checkpoint metadata, a removed bitmap, foreign checkpoints,
disks added and resized mid-chain. Every run extends the chain exactly or says what happened."""
from __future__ import annotations

import json

import pytest

from tests.lab.apply_chain import apply_chain
from tests.lab.libvirt_lab import DiskSpec, MiB, compare_images
from tests.system.backup_helpers import check_point, ok
from tests.system.chain_helpers import (
    check_restored,
    checkpoint_names,
    error_line,
    fails,
    manifest_points,
    points,
    snap_all,
    write_all,
)

pytestmark = pytest.mark.system

SIZE = 16 * MiB
SAFE = ("data", "data", "pattern", "zero")


def _write(dom, seed: int) -> None:  # type: ignore[no-untyped-def]
    write_all(dom, seed, 6, SAFE)



def test_lost_checkpoint_metadata_is_redefined_from_the_set(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    folder = dom.dir / "backup"
    expected = {}
    _write(dom, 1)
    ok(dom, "full", folder)
    expected["virtnbdbackup.0"] = snap_all(dom, "p0")
    _write(dom, 2)
    ok(dom, "inc", folder)
    expected["virtnbdbackup.1"] = snap_all(dom, "p1")
    dom.stop()                                  # (a running domain keeps its checkpoints in memory)
    dom.redefine()                              # undefine (checkpoint metadata dropped) + define from its XML
    assert checkpoint_names(dom) == []
    dom.start()
    _write(dom, 3)
    res = ok(dom, "inc", folder)
    assert res["point"] == "virtnbdbackup.2"
    expected["virtnbdbackup.2"] = snap_all(dom, "p2")
    assert checkpoint_names(dom) == ["virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2"]
    for point, images in expected.items():
        check_point(dom, folder, point, images, tmp_path)

    # shut off, metadata lost again: the offline inc redefines too
    dom.stop()
    dom.redefine()
    assert checkpoint_names(dom) == []
    _write(dom, 4)
    assert ok(dom, "inc", folder)["point"] == "virtnbdbackup.3"
    check_point(dom, folder, "virtnbdbackup.3", snap_all(dom, "p3"), tmp_path)


def test_removed_bitmap_fails_clearly_then_auto_starts_a_new_chain(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    sda = dom.disk("sda")
    folder = dom.dir / "backup"
    _write(dom, 1)
    ok(dom, "full", folder)
    _write(dom, 2)
    ok(dom, "inc", folder)
    old_p1 = snap_all(dom, "p1")
    dom.stop()
    sda.remove_bitmap("virtnbdbackup.1")
    _write(dom, 3)

    # offline inc: the exact cause and the fix, nothing committed, nothing changed
    line = error_line(fails(dom, "inc", folder))
    assert "bitmap virtnbdbackup.1 is missing" in line and "--fallback-full" in line, line
    assert points(folder) == ["virtnbdbackup.0", "virtnbdbackup.1"]
    # online inc: libvirt still lists the checkpoint, but the bitmap is gone: same verdict
    dom.start()
    line = error_line(fails(dom, "inc", folder))
    assert "virtnbdbackup.1" in line and "missing or broken" in line and "-l full -o NEW_FOLDER" in line, line
    assert points(folder) == ["virtnbdbackup.0", "virtnbdbackup.1"]

    # -l auto: the old chain moves to chain-<time>/, a new full starts here, and says so
    res = ok(dom, "auto", folder)
    assert res["level"] == "full" and res["point"] == "virtnbdbackup.0"
    assert len(res["notes"]) == 1 and "chain broken" in res["notes"][0], res["notes"]
    archived = sorted(folder.glob("chain-*"))
    assert len(archived) == 1
    assert points(archived[0]) == ["virtnbdbackup.0", "virtnbdbackup.1"]
    expected = {"virtnbdbackup.0": snap_all(dom, "n0")}
    _write(dom, 4)
    assert ok(dom, "auto", folder)["point"] == "virtnbdbackup.1"
    expected["virtnbdbackup.1"] = snap_all(dom, "n1")
    for point, images in expected.items():
        check_point(dom, folder, point, images, tmp_path)
    # the moved chain is still a complete, restorable set
    out = tmp_path / "old.raw"
    apply_chain(archived[0], "sda", "virtnbdbackup.1", out)
    compare_images(out, old_p1["sda"], fmt="raw")
    check_restored(archived[0], "virtnbdbackup.1", old_p1, tmp_path)


def test_fallback_full_on_an_offline_domain(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    folder = dom.dir / "backup"
    _write(dom, 1)
    ok(dom, "full", folder)
    dom.stop()
    dom.disk("sda").remove_bitmap("virtnbdbackup.0")
    _write(dom, 2)
    res = ok(dom, "inc", folder, "--fallback-full")
    assert res["level"] == "full" and res["consistency"] == "offline" and res["notes"]
    check_point(dom, folder, "virtnbdbackup.0", snap_all(dom, "f0"), tmp_path)
    dom.start()
    _write(dom, 3)
    assert ok(dom, "inc", folder)["point"] == "virtnbdbackup.1"
    check_point(dom, folder, "virtnbdbackup.1", snap_all(dom, "f1"), tmp_path)


def test_foreign_checkpoint_is_never_removed_and_never_blocks(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    folder = dom.dir / "backup"
    foreign = ("<domaincheckpoint><name>other-tool.7</name><disks><disk name='sda' checkpoint='bitmap'/>"
               "</disks></domaincheckpoint>")
    dom.dom.checkpointCreateXML(foreign, 0)              # before our chain
    _write(dom, 1)
    ok(dom, "full", folder)
    expected = {"virtnbdbackup.0": snap_all(dom, "p0")}
    _write(dom, 2)
    dom.dom.checkpointCreateXML(foreign.replace("other-tool.7", "other-tool.8"), 0)   # in the middle
    ok(dom, "inc", folder)
    expected["virtnbdbackup.1"] = snap_all(dom, "p1")
    dom.stop()                                           # offline inc and a new chain leave them alone too
    _write(dom, 3)
    ok(dom, "inc", folder)
    expected["virtnbdbackup.2"] = snap_all(dom, "p2")
    ok(dom, "full", dom.dir / "second-chain")
    # offline, the new chain removed our old bitmaps only: the foreign ones stay in the image
    assert sorted(dom.disk("sda").bitmaps()) == ["other-tool.7", "other-tool.8", "virtnbdbackup.0"]
    dom.start()
    _write(dom, 4)
    ok(dom, "inc", dom.dir / "second-chain")
    names = checkpoint_names(dom)
    assert "other-tool.7" in names and "other-tool.8" in names, names
    for point, images in expected.items():
        check_point(dom, folder, point, images, tmp_path)
    check_point(dom, dom.dir / "second-chain", "virtnbdbackup.1", snap_all(dom, "s1"), tmp_path)


def test_disk_added_and_disk_resized_mid_chain(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    sda = dom.disk("sda")
    folder = dom.dir / "backup"
    expected = {}
    _write(dom, 1)
    ok(dom, "full", folder)
    expected["virtnbdbackup.0"] = snap_all(dom, "p0")

    vdb = dom.attach_disk(DiskSpec("vdb", "virtio", "qcow2", SIZE))     # hot-plugged
    sda.resize(SIZE + 8 * MiB)                                          # blockResize, live
    _write(dom, 2)
    sda.write_data(SIZE + MiB, 2 * MiB, seed=77)                        # into the grown area
    res = ok(dom, "inc", folder)
    assert res["point"] == "virtnbdbackup.1"
    expected["virtnbdbackup.1"] = snap_all(dom, "p1")
    entries = manifest_points(folder)[1]["disks"]
    assert entries["vdb"]["extra"]["mode"] == "full" and entries["sda"]["extra"]["mode"] == "full"
    assert entries["sda"]["virtual_size"] == SIZE + 8 * MiB

    _write(dom, 3)
    vdb.write_data(0, MiB, seed=5)
    ok(dom, "inc", folder)
    expected["virtnbdbackup.2"] = snap_all(dom, "p2")
    entries = manifest_points(folder)[2]["disks"]
    assert entries["vdb"]["extra"]["mode"] == "inc" and entries["sda"]["extra"]["mode"] == "inc"
    _write(dom, 4)
    diff = ok(dom, "diff", folder)["point"]
    expected[diff] = snap_all(dom, "p2d")

    for point, images in expected.items():
        check_point(dom, folder, point, images, tmp_path)
    # virtnbdrestore: each point at its own size, the new disk from the point where it appeared
    for point in ("virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2", diff):
        check_restored(folder, point, expected[point], tmp_path)
    assert json.loads((folder / "virtnbd.manifest.json").read_text())["points"][0]["disks"].keys() == {"sda"}


def test_disk_shrunk_then_grown_offline_restores_each_size(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Shrink, then grow: data beyond the small size must not come back at the later points."""
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    sda = dom.disk("sda")
    folder = dom.dir / "backup"
    sda.write_data(0, MiB, seed=1)
    sda.write_data(12 * MiB, 2 * MiB, seed=2)           # lost by the shrink below
    ok(dom, "full", folder)
    expected = {"virtnbdbackup.0": snap_all(dom, "p0")}
    dom.stop()
    sda.resize(8 * MiB)
    res = ok(dom, "inc", folder)
    expected[res["point"]] = snap_all(dom, "p1")
    sda.resize(20 * MiB)
    sda.write_data(18 * MiB, MiB, seed=3)
    res = ok(dom, "inc", folder)
    expected[res["point"]] = snap_all(dom, "p2")
    dom.start()
    sda.write_data(2 * MiB, MiB, seed=4)
    res = ok(dom, "inc", folder)
    expected[res["point"]] = snap_all(dom, "p3")
    sizes = [p["disks"]["sda"]["virtual_size"] for p in manifest_points(folder)]
    assert sizes == [SIZE, 8 * MiB, 20 * MiB, 20 * MiB]
    modes = [p["disks"]["sda"]["extra"]["mode"] for p in manifest_points(folder)]
    assert modes == ["full", "full", "full", "inc"]
    for point, images in expected.items():
        check_point(dom, folder, point, images, tmp_path)
        check_restored(folder, point, images, tmp_path)


def test_qemu_crash_loses_bitmaps_detected_then_auto_restarts(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """QEMU SIGKILLed (host crash): bitmaps created in that session never reach the image, older ones are
    left 'in-use'. Offline and online runs refuse to continue the chain; -l auto starts a new one."""
    import os
    import signal
    import time
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    folder = dom.dir / "backup"
    _write(dom, 1)
    ok(dom, "full", folder)
    _write(dom, 2)
    ok(dom, "inc", folder)
    dom.disk("sda").flush()          # data and qcow2 metadata on disk (the shadow stays true); bitmaps are not
    pid = int(open(f"/run/libvirt/qemu/{dom.name}.pid").read())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while dom.is_active() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not dom.is_active()
    line = error_line(fails(dom, "inc", folder))
    assert "bitmap virtnbdbackup.1" in line and "--fallback-full" in line, line
    dom.start()
    line = error_line(fails(dom, "inc", folder))
    assert "virtnbdbackup.1 is missing or broken in the running domain" in line, line
    assert points(folder) == ["virtnbdbackup.0", "virtnbdbackup.1"]
    _write(dom, 3)
    res = ok(dom, "auto", folder)
    assert res["level"] == "full" and res["notes"]
    check_point(dom, folder, "virtnbdbackup.0", snap_all(dom, "c0"), tmp_path)
    _write(dom, 4)
    assert ok(dom, "auto", folder)["point"] == "virtnbdbackup.1"
    check_point(dom, folder, "virtnbdbackup.1", snap_all(dom, "c1"), tmp_path)
