"""``virtnbdbackup -t qcow2 --push``: libvirt push-mode jobs write the point images (real libvirtd + QEMU).

Proof by bytes: every point's image, opened as qemu opens it (its relative backing chain), compares
identical with the disk as it was at that point (``qemu-img compare``), every point restores
identical with ``virtnbdrestore --until``, and ``-a verify`` passes on the integrity records.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab.images import compare_images
from tests.lab.libvirt_lab import DiskSpec, MiB, random_writes
from tests.system.backup_helpers import job_running, leftovers, ok
from tests.system.chain_helpers import REPO, check_restored

pytestmark = pytest.mark.system

SIZE = 32 * MiB
PUSH = ("-t", "qcow2", "--push")


def _manifest(folder: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((folder / "virtnbd.manifest.json").read_text())


def _image(folder: Path, point: str, disk: str) -> Path:
    for p in _manifest(folder)["points"]:
        if p["name"] == point:
            return folder / p["disks"][disk]["file"]
    raise AssertionError(f"no point {point} in {folder}")


def _backing(image: Path) -> str | None:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)], check=True,
                                     capture_output=True, text=True).stdout)
    return info.get("backing-filename")


def _check_images(folder: Path, expected: dict[str, dict[str, Path]]) -> None:
    for point, disks in expected.items():
        for disk, shadow in disks.items():
            compare_images(_image(folder, point, disk), shadow, fmt="qcow2")


def test_push_chain_two_disks_every_point_exact(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE), DiskSpec("sdb", "sata", "qcow2", SIZE)])
    sda, sdb = dom.disk("sda"), dom.disk("sdb")
    folder = dom.dir / "backup"
    sda.write_data(0, 6 * MiB, seed=1)
    sdb.write_pattern(4 * MiB, 3 * MiB, 0x5A)
    summary = ok(dom, "full", folder, *PUSH)
    assert summary["push"]["job_seconds"] > 0
    expected = {"virtnbdbackup.0": {"sda": sda.snapshot("p0"), "sdb": sdb.snapshot("p0b")}}

    # data, patterns, write-zeroes, discards between the points
    for i, point in enumerate(("virtnbdbackup.1", "virtnbdbackup.2", "virtnbdbackup.3"), start=1):
        sda.apply_all(random_writes(seed=10 + i, n=12, size=SIZE))
        sdb.apply_all(random_writes(seed=20 + i, n=12, size=SIZE))
        sda.write_zero(i * MiB, 256 * 1024)
        sdb.discard(4 * MiB + i * 512 * 1024, 256 * 1024)
        assert ok(dom, "inc", folder, *PUSH)["point"] == point
        expected[point] = {"sda": sda.snapshot(f"p{i}"), "sdb": sdb.snapshot(f"p{i}b")}
    sda.write_pattern(20 * MiB, 2 * MiB, 0x11)
    sdb.write_zero(0, 2 * MiB)
    diff = ok(dom, "diff", folder, *PUSH)["point"]
    assert diff.startswith("diff.")
    expected[diff] = {"sda": sda.snapshot("pd"), "sdb": sdb.snapshot("pdb")}
    sda.apply_all(random_writes(seed=40, n=10, size=SIZE))
    sdb.write_data(10 * MiB, 1 * MiB, seed=41)
    assert ok(dom, "inc", folder, *PUSH)["point"] == "virtnbdbackup.4"
    expected["virtnbdbackup.4"] = {"sda": sda.snapshot("p4"), "sdb": sdb.snapshot("p4b")}

    assert not job_running(dom)
    assert leftovers(folder, dom.dir) == []
    manifest = _manifest(folder)
    assert [p["name"] for p in manifest["points"]] == [*expected]
    for p in manifest["points"]:
        for disk, entry in p["disks"].items():
            assert entry["file"] == f"{disk}.{p['name']}.qcow2"
            assert entry["extra"]["writer"] == "push"
            assert entry["extra"]["integrity"]["regions"], "no integrity record"
    # inc: overlay on the previous point; the diff: on the newest full/inc (virtnbdbackup.3)
    assert _backing(folder / "sda.virtnbdbackup.0.qcow2") is None
    assert _backing(folder / "sda.virtnbdbackup.1.qcow2") == "sda.virtnbdbackup.0.qcow2"
    assert _backing(folder / f"sdb.{diff}.qcow2") == "sdb.virtnbdbackup.3.qcow2"
    assert _backing(folder / "sda.virtnbdbackup.4.qcow2") == "sda.virtnbdbackup.3.qcow2"
    _check_images(folder, expected)
    for point, images in expected.items():                # virtnbdrestore --until, every point
        check_restored(folder, point, images, tmp_path)
    verify = subprocess.run([sys.executable, str(REPO / "virtnbdrestore"), "-n", "-i", str(folder), "-a", "verify"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert verify.returncode == 0, verify.stderr

    # the folder copied elsewhere still opens (relative backing names)
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    _check_images(moved, {"virtnbdbackup.4": expected["virtnbdbackup.4"]})


def test_push_of_a_shut_off_domain_is_written_by_the_pull_path(make_domain) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    sda = dom.disk("sda")
    folder = dom.dir / "backup"
    sda.write_data(0, 2 * MiB, seed=3)
    ok(dom, "full", folder, *PUSH)
    sda.write_pattern(8 * MiB, 1 * MiB, 0x42)
    p1 = sda.snapshot("p1")
    dom.stop()
    summary = ok(dom, "inc", folder, *PUSH)
    assert any("--push needs a running QEMU" in note for note in summary["notes"]), summary["notes"]
    assert not summary.get("push")
    compare_images(_image(folder, "virtnbdbackup.1", "sda"), p1, fmt="qcow2")
