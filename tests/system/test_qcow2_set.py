"""qcow2 sets (-t qcow2, pull engine) of a running domain with two disks (issue 12).

full -> writes (data, patterns, write-zeroes, discards, also 4 KiB-aligned) -> inc x3 -> diff -> inc:
each point's image compares identical to the disk at that point, each point restores identical
with virtnbdrestore --until, the folder copied with cp -a still compares identical, verify passes,
dump names the kind.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab.libvirt_lab import DiskSpec, MiB, compare_images, random_writes
from tests.system.backup_helpers import REPO, ok
from tests.system.chain_helpers import check_restored

pytestmark = pytest.mark.system

SIZE = 24 * MiB
DISKS = ("sda", "sdb")
PLAN = ("inc", "inc", "inc", "diff", "inc")


def restore_cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(REPO / "virtnbdrestore"), "-n", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def image_info(path: Path) -> dict:  # type: ignore[type-arg]
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return dict(json.loads(out))


def build_chain(dom, folder: Path) -> dict[str, dict[str, Path]]:  # type: ignore[no-untyped-def]
    """full -> inc x3 -> diff -> inc with -t qcow2; the expected image of every disk at every point."""
    expected: dict[str, dict[str, Path]] = {}
    for n, target in enumerate(DISKS):
        dom.disk(target).apply_all(random_writes(seed=40 + n, n=16, size=SIZE))
    summary = ok(dom, "full", folder, "-t", "qcow2")
    expected[summary["point"]] = {t: dom.disk(t).snapshot("q0") for t in DISKS}
    for step, level in enumerate(PLAN, start=1):
        for n, target in enumerate(DISKS):
            # step 2: 4 KiB-aligned writes inside 64 KiB clusters (no discards: QEMU ignores a discard
            # smaller than a qcow2 cluster of the source disk, so its result is not known)
            fine = {"align": 4096, "kinds": ("data", "pattern", "zero")} if step == 2 else {}
            dom.disk(target).apply_all(random_writes(seed=400 + 10 * step + n, n=12, size=SIZE, **fine))
        summary = ok(dom, level, folder, "-t", "qcow2")
        expected[summary["point"]] = {t: dom.disk(t).snapshot(f"q{step}") for t in DISKS}
    return expected


def check_images(folder: Path, expected: dict[str, dict[str, Path]]) -> None:
    """Each point's image by itself (with its backing chain) is the disk at that point."""
    for point, images in expected.items():
        for target, image in images.items():
            compare_images(folder / f"{target}.{point}.qcow2", image, fmt="qcow2")


def test_qcow2_chain_every_point_exact(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec(t, "sata", "qcow2", SIZE) for t in DISKS])
    folder = dom.dir / "backup"
    expected = build_chain(dom, folder)
    manifest = json.loads((folder / "virtnbd.manifest.json").read_text())
    names = [p["name"] for p in manifest["points"]]
    assert names == list(expected)
    assert [p["level"] for p in manifest["points"]] == ["full", *PLAN]
    assert json.loads((folder / "virtnbd.set.json").read_text())["kind"] == "qcow2"
    assert not list(folder.glob("*.partial")) and not list(folder.glob("*.data"))

    # layout: full standalone, inc on the previous full/inc, diff on the newest full/inc, relative names
    chain_parent = {names[1]: names[0], names[2]: names[1], names[3]: names[2], names[4]: names[3],
                    names[5]: names[3]}
    assert "backing-filename" not in image_info(folder / f"sda.{names[0]}.qcow2")
    for point, parent in chain_parent.items():
        info = image_info(folder / f"sda.{point}.qcow2")
        assert info["backing-filename"] == f"sda.{parent}.qcow2", (point, info)
        assert info["backing-filename-format"] == "qcow2"
    check_images(folder, expected)

    # thin: the full holds about the data written, an inc far less than the disk
    full_size = (folder / f"sda.{names[0]}.qcow2").stat().st_size
    assert full_size < SIZE, full_size

    for point, images in expected.items():
        check_restored(folder, point, images, tmp_path)

    moved = tmp_path / "moved"
    shutil.copytree(folder, moved, symlinks=True)
    subprocess.run(["cp", "-a", str(folder), str(tmp_path / "copied")], check=True)
    for where in (tmp_path / "copied", moved):
        check_images(where, expected)
    shutil.rmtree(folder)          # the copy stands alone
    proc = restore_cli("-i", str(tmp_path / "copied"), "-a", "verify")
    assert proc.returncode == 0, proc.stderr
    check_restored(tmp_path / "copied", names[-1], expected[names[-1]], tmp_path / "r2")

    dump = restore_cli("-i", str(tmp_path / "copied"), "-a", "dump", "--json")
    assert dump.returncode == 0, dump.stderr
    assert json.loads(dump.stdout)["kind"] == "qcow2"
