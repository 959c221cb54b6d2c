"""full -> inc x3 -> diff -> inc of a running domain with two qcow2 disks: every point exact."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.lab.libvirt_lab import DiskSpec, MiB, compare_images, random_writes
from tests.system.backup_helpers import REPO, check_point, must_read_blocks, ok

pytestmark = pytest.mark.system

SIZE = 32 * MiB
DISKS = ("sda", "sdb")


def _restore(folder, point, out_dir):  # type: ignore[no-untyped-def]
    cmd = [sys.executable, str(REPO / "virtnbdrestore"), "-n", "-i", str(folder), "-o", str(out_dir), "-a", "restore",
           "--until", point, "--format", "raw"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, check=False)


def test_chain_restores_every_point_exactly(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec(t, "sata", "qcow2", SIZE) for t in DISKS])
    folder = dom.dir / "backup"
    expected: dict[str, dict[str, object]] = {}
    for n, target in enumerate(DISKS):
        dom.disk(target).apply_all(random_writes(seed=10 + n, n=20, size=SIZE))

    summary = ok(dom, "full", folder)
    assert summary["point"] == "virtnbdbackup.0"
    expected["virtnbdbackup.0"] = {t: dom.disk(t).snapshot("p0") for t in DISKS}

    since_parent: dict[str, list] = {t: [] for t in DISKS}
    plan = ["inc", "inc", "inc", "diff", "inc"]
    for step, level in enumerate(plan, start=1):
        for n, target in enumerate(DISKS):
            ops = random_writes(seed=100 * step + n, n=12, size=SIZE)
            dom.disk(target).apply_all(ops)
            since_parent[target] += ops
        summary = ok(dom, level, folder)
        point = summary["point"]
        assert point.startswith("diff." if level == "diff" else "virtnbdbackup.")
        expected[point] = {t: dom.disk(t).snapshot(f"p{step}") for t in DISKS}
        for target in DISKS:
            # the inc/diff read exactly the blocks the bitmap marks and still hold data
            assert summary["disks"][target]["bytes_read"] == must_read_blocks(since_parent[target]), (level, target)
        if level == "inc":
            since_parent = {t: [] for t in DISKS}

    manifest = json.loads((folder / "virtnbd.manifest.json").read_text())
    names = [p["name"] for p in manifest["points"]]
    assert names == list(expected)
    assert [p["level"] for p in manifest["points"]] == ["full", *plan]
    for point, images in expected.items():
        check_point(dom, folder, point, images, tmp_path)  # type: ignore[arg-type]
    # the saved side files are there
    assert (folder / "vmconfig.virtnbdbackup.0.xml").is_file()
    assert (folder / "checkpoints" / "virtnbdbackup.4.xml").is_file()
    info = json.loads((folder / "sda.virtnbdbackup.0.qemu-img.json").read_text())
    assert info["format"] == "qcow2" and info["cluster-size"] == 65536

    # the real restore engine agrees at two points (newest and a middle one)
    for point in (names[-1], names[2]):
        out_dir = tmp_path / f"restore-{point}"
        proc = _restore(folder, point, out_dir)
        if proc.returncode != 0:
            pytest.fail(f"virtnbdrestore failed: {proc.stderr}")
        for target, image in expected[point].items():
            found = sorted(p for p in out_dir.iterdir() if p.name.startswith(target))
            assert found, f"no restored image of {target} in {sorted(p.name for p in out_dir.iterdir())}"
            restored = found[0]
            compare_images(restored, image, fmt="raw")  # type: ignore[arg-type]
