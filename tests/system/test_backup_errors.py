"""Refused runs: one clear line, non-zero exit, nothing committed."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.lab.libvirt_lab import DiskSpec, MiB
from tests.system.backup_helpers import BACKUP, backup, leftovers, ok

pytestmark = pytest.mark.system
libvirt = pytest.importorskip("libvirt")

SIZE = 16 * MiB


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if "error" in ln]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def _points(folder) -> list[str]:  # type: ignore[no-untyped-def]
    path = folder / "virtnbd.manifest.json"
    return [p["name"] for p in json.loads(path.read_text())["points"]] if path.exists() else []


def test_errors(make_domain) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    other = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    dom.disk("sda").write_data(0, MiB, seed=1)

    # unknown domain
    proc = subprocess.run([sys.executable, BACKUP, "-d", "vnbdtest-no-such-domain", "-l", "full", "-o",
                           str(dom.dir / "none")], capture_output=True, text=True, check=False)
    assert proc.returncode == 1
    assert "domain not found: vnbdtest-no-such-domain" in _error_line(proc.stderr)
    assert not (dom.dir / "none").exists()

    # inc without a full
    empty = dom.dir / "empty"
    res = backup(dom, "inc", empty)
    assert res.rc == 1
    assert "no full backup" in _error_line(res.stderr)
    assert _points(empty) == []

    # a folder holding another domain's chain
    folder = dom.dir / "chain"
    ok(dom, "full", folder)
    res = backup(other, "inc", folder)
    assert res.rc == 1
    line = _error_line(res.stderr)
    assert f"holds the backup chain of domain {dom.name}" in line and other.name in line
    assert _points(folder) == ["virtnbdbackup.0"]

    # missing checkpoint in libvirt (metadata lost) and no saved XML to redefine it from
    cp = dom.dom.checkpointLookupByName("virtnbdbackup.0")
    cp.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
    (folder / "checkpoints" / "virtnbdbackup.0.xml").unlink()
    dom.disk("sda").write_data(2 * MiB, MiB, seed=2)
    res = backup(dom, "inc", folder)
    assert res.rc == 1, res.stderr
    line = _error_line(res.stderr)
    assert "virtnbdbackup.0" in line and "missing" in line, line
    assert _points(folder) == ["virtnbdbackup.0"]
    assert leftovers(folder, dom.dir) == []
    assert not dom.dom.listAllCheckpoints()
