"""A real domain: full + 12 incs, consolidate the oldest 8 into a synthetic full. Every listed point
restores byte-identical to the disk at that point, verify passes, the next inc continues the chain
(libvirt checkpoints untouched) and the stored bytes shrink by what the merged points superseded."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.lab.libvirt_lab import DiskSpec, MiB, random_writes
from tests.system.backup_helpers import REPO, ok
from tests.system.chain_helpers import check_restored, checkpoint_names, manifest_points

pytestmark = pytest.mark.system

SIZE = 8 * MiB
INCS = 12
MERGE = 8             # incs merged with the full into the synthetic full


def _prune(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(REPO / "virtnbdprune"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def _stored(folder) -> int:  # type: ignore[no-untyped-def]
    return sum(d["stored_bytes"] for p in manifest_points(folder) for d in p["disks"].values())


def test_consolidate_eight_of_twelve_incs(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    disk = dom.disk("sda")
    folder = dom.dir / "backup"
    disk.apply_all(random_writes(seed=1, n=30, size=SIZE))
    expected = {ok(dom, "full", folder)["point"]: {"sda": disk.snapshot("p0")}}
    for step in range(1, INCS + 1):
        disk.apply_all(random_writes(seed=100 + step, n=4, size=SIZE))
        expected[ok(dom, "inc", folder)["point"]] = {"sda": disk.snapshot(f"p{step}")}
    checkpoints = checkpoint_names(dom)
    before = _stored(folder)
    merged_points = manifest_points(folder)[:MERGE + 1]
    merged_stored = sum(p["disks"]["sda"]["stored_bytes"] for p in merged_points)
    merged_data = sum(p["disks"]["sda"]["data_bytes"] for p in merged_points)
    # what the merged points hold that later points overwrote is gone; the rest stays
    res = _prune("-i", str(folder), "--consolidate", f"virtnbdbackup.{MERGE}", "--json")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert len(result["merged"]) == MERGE + 1 and result["stored_after"] < result["stored_before"] == before
    points = [p["name"] for p in manifest_points(folder)]
    assert points == [f"virtnbdbackup.{i}" for i in range(MERGE, INCS + 1)]
    assert manifest_points(folder)[0]["level"] == "full"
    assert checkpoint_names(dom) == checkpoints                        # libvirt untouched
    full = manifest_points(folder)[0]["disks"]["sda"]
    assert _stored(folder) == before - merged_stored + full["stored_bytes"]
    assert full["data_bytes"] < merged_data                           # superseded bytes are gone
    for point in points:
        check_restored(folder, point, expected[point], tmp_path)
    verify = subprocess.run([sys.executable, str(REPO / "virtnbdrestore"), "-i", str(folder), "-a", "verify", "-n"],
                            capture_output=True, text=True, timeout=300, check=False)
    assert verify.returncode == 0, verify.stderr
    disk.apply_all(random_writes(seed=777, n=4, size=SIZE))
    nxt = ok(dom, "inc", folder)
    assert nxt["level"] == "inc" and nxt["point"] == f"virtnbdbackup.{INCS + 1}"
    check_restored(folder, nxt["point"], {"sda": disk.snapshot("pnext")}, tmp_path)
    status = _prune("-i", str(folder), "--status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["points"] == INCS - MERGE + 2
