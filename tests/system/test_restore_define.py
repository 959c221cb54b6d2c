"""-c/-D: the adjusted domain XML is accepted by libvirt, boots the restored disk, and differs from the
original where it must (name, UUID, MAC, disk path and driver type)."""
from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
from lxml import etree

from tests.lab.libvirt_lab import DiskSpec, MiB, random_writes
from tests.system.backup_helpers import REPO, ok

pytestmark = pytest.mark.system


def test_define_restored_domain_and_start_it(make_domain, libvirt_conn, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import libvirt
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", 16 * MiB)])
    dom.disk("sda").apply_all(random_writes(seed=5, n=10, size=16 * MiB))
    folder = dom.dir / "backup"
    ok(dom, "full", folder)
    out = dom.dir / "restored"
    name = f"vnbdtest-r{uuid.uuid4().hex[:8]}"
    res = subprocess.run([sys.executable, str(REPO / "virtnbdrestore"), "-n", "-i", str(folder), "-o", str(out),
                          "--format", "raw", "-D", "-N", name], capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stderr
    new = libvirt_conn.lookupByName(name)
    try:
        root = etree.fromstring(new.XMLDesc(0).encode())
        orig = etree.fromstring(dom.xml().encode())
        assert root.findtext("uuid") != orig.findtext("uuid")
        disk = root.find("devices/disk")
        assert disk.find("source").get("file") == str(out / "sda.raw")
        assert disk.find("driver").get("type") == "raw"
        new.create()
        assert new.isActive()
        new.destroy()
    finally:
        if new.isActive():
            new.destroy()
        flags = getattr(libvirt, "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 0)
        new.undefineFlags(flags)
    subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(out / "sda.raw"),
                    str(dom.disk("sda").shadow)], check=True)
