"""-D/--define on a real guest (the lab's tiny Linux guest with a network card): the backup keeps copies
of its kernel and initrd; the restored domain is accepted by libvirt, boots, mounts the restored disk
(its agent reads a file from it), and has a new name, UUID and MAC.

The original guest is never booted (backed up offline); only the restored one boots.

Not here: UEFI. OVMF_CODE_4M with direct kernel boot does boot the tiny guest under TCG with 256 MiB
(about 20-50 s to its init, load-dependent; with the lab's 128 MiB it resets before the kernel prints),
too slow for the suite, so the NVRAM copy of -c is proven by
tests/functional/test_restore.py::test_adjust_config (a copy at a new path with the saved bytes)."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.lab.guest_lab import DATA_MOUNT, Guest
from tests.system.backup_helpers import REPO

pytestmark = [pytest.mark.system, pytest.mark.guest]

MARKER = b"written before the backup by the host, read after the restore by the guest\n"


def _cli(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([sys.executable, str(REPO / tool), *args], capture_output=True, text=True, timeout=300,
                         check=False)
    assert res.returncode == 0, res.stderr
    return res


def _boot_files(folder: Path) -> dict[str, str]:
    doc = json.loads(_cli("virtnbdrestore", "-i", str(folder), "-a", "dump", "--json").stdout)
    return doc["points"][-1]["extra"]["boot_files"]


def _macs(xml: str) -> list[str]:
    return [str(m) for m in etree.fromstring(xml.encode()).xpath("devices/interface/mac/@address")]


def test_restored_guest_boots_with_a_new_mac(make_guest: Any, libvirt_conn: Any, guest_build: Any) -> None:
    import libvirt

    # The original is defined, never booted: the marker is written into its disk by the host and the backup
    # is taken offline (qemu-nbd). Only the restored domain boots, so one boot proves what two did.
    orig = make_guest(nic=True, files={"marker": MARKER}, start=False)
    folder = orig.dir / "backup"          # under the lab folder: QEMU (libvirt-qemu) must reach the files
    _cli("virtnbdbackup", "-d", orig.name, "-l", "full", "-o", str(folder), "-n", "--scratchdir", str(orig.dir))
    boot = _boot_files(folder)
    assert (folder / boot["kernel"]).read_bytes() == guest_build.kernel.read_bytes()
    assert (folder / boot["initrd"]).read_bytes() == guest_build.initrd.read_bytes()
    orig_xml = orig.dom.XMLDesc(0)
    assert len(_macs(orig_xml)) == 1       # libvirt gave the defined domain its MAC

    out = orig.dir / "restored"
    name = f"vnbdtest-r{uuid.uuid4().hex[:8]}"
    _cli("virtnbdrestore", "-i", str(folder), "-o", str(out), "-n", "--format", "qcow2", "-D", "-N", name)
    new = Guest.attach(libvirt_conn, name)
    try:
        xml = new.dom.XMLDesc(0)
        root = etree.fromstring(xml.encode())
        assert root.findtext("uuid") != etree.fromstring(orig_xml.encode()).findtext("uuid")
        assert root.find("devices/disk/source").get("file") == str(out / "vda.qcow2")
        assert len(_macs(xml)) == 1 and _macs(xml) != _macs(orig_xml)
        new.dom.create()
        new.wait_answer()
        assert new.sh(f"cat {DATA_MOUNT}/marker").encode() == MARKER
        assert "vda" in new.sh(f"grep ' {DATA_MOUNT} ' /proc/mounts")
    finally:
        if new.dom.isActive():
            new.dom.destroy()
        new.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
