"""virtnbdrestore -a instant of a domain with two disks (virtio qcow2 + sata raw, an inc point):
both disks run on overlays of the served export, both are copied and switched over, and each
final image is the disk at that point (``--paused``: the domain never runs before the switch)."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.lab.images import compare_images
from tests.lab.libvirt_lab import DiskSpec, MiB, random_writes
from tests.system.backup_helpers import REPO, ok

pytestmark = pytest.mark.system


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_instant_of_two_disks_copies_and_switches_both(make_domain, libvirt_conn: Any) -> None:  # type: ignore[no-untyped-def]
    import libvirt

    dom = make_domain(disks=[DiskSpec("vda", "virtio", "qcow2", 24 * MiB), DiskSpec("sdb", "sata", "raw", 16 * MiB)])
    folder = dom.dir / "backup"
    for n, disk in enumerate(dom.disks.values()):
        disk.write_data(MiB, 6 * MiB, seed=40 + n)
    ok(dom, "full", folder)
    for n, disk in enumerate(dom.disks.values()):
        disk.apply_all(random_writes(seed=50 + n, n=12, size=disk.size))
    point = str(ok(dom, "inc", folder)["point"])
    expected = {t: d.snapshot(point) for t, d in dom.disks.items()}
    for disk in dom.disks.values():
        disk.apply_all(random_writes(seed=60, n=8, size=disk.size))     # after the point: must not show
    dom.stop()
    before = _digests(folder)
    name, out = f"vnbdtest-i{uuid.uuid4().hex[:8]}", dom.dir / "instant"   # QEMU (not root) reaches it
    proc = subprocess.run([sys.executable, str(REPO / "virtnbdrestore"), "-n", "-a", "instant", "-i", str(folder),
                           "--until", point, "-o", str(out), "-N", name, "--paused"],
                          check=False, capture_output=True, text=True, timeout=300)
    try:
        assert proc.returncode == 0, proc.stderr
        new = libvirt_conn.lookupByName(name)
        for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
            root = etree.fromstring(new.XMLDesc(flags).encode())
            assert sorted(root.xpath("devices/disk/source/@file")) == sorted(str(out / f"{t}.qcow2") for t in expected)
            assert not root.xpath("devices/disk//source[@protocol='nbd']")
        new.destroy()
        for target, image in expected.items():
            compare_images(out / f"{target}.qcow2", image, fmt="qcow2")
    finally:
        try:
            found = libvirt_conn.lookupByName(name)
        except libvirt.libvirtError:
            found = None
        if found is not None:
            if found.isActive():
                found.destroy()
            found.undefine()
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".log")) == ["sdb.qcow2", "vda.qcow2"]
    assert _digests(folder) == before
