"""The lab's real guest boots from a new overlay on top of an inc point's image of a -t qcow2 set:
its agent answers, the files written before that point are there, and the set still verifies."""
from __future__ import annotations

import subprocess
import sys
import uuid
from typing import Any

import pytest

from tests.lab.guest_lab import DATA_MOUNT, Guest, guest_xml
from tests.system.backup_helpers import REPO

pytestmark = [pytest.mark.system, pytest.mark.guest]

MARKER = b"on the disk before the full\n"
SECOND = "written by the guest before the inc"


def _cli(tool: str, *args: str) -> None:
    proc = subprocess.run([sys.executable, str(REPO / tool), *args], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr


def test_guest_boots_on_overlay_of_inc_image(make_guest: Any, libvirt_conn: Any, guest_build: Any) -> None:
    import libvirt

    orig = make_guest(files={"marker": MARKER})
    folder = orig.dir / "backup"
    # --umask 022: QEMU runs as libvirt-qemu here and must read the images (default: 0600 files)
    common = ("-d", orig.name, "-o", str(folder), "-n", "-t", "qcow2", "--umask", "022",
              "--scratchdir", str(orig.dir))
    _cli("virtnbdbackup", "-l", "full", *common)
    orig.write_file(f"{DATA_MOUNT}/second", SECOND)
    orig.sync()
    _cli("virtnbdbackup", "-l", "inc", *common)
    orig.write_file(f"{DATA_MOUNT}/third", "after the inc")
    orig.sync()
    orig.dom.destroy()

    image = folder / "vda.virtnbdbackup.1.qcow2"
    overlay = orig.dir / "boot-overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", "qcow2", str(overlay)],
                   check=True)
    name = f"vnbdtest-q{uuid.uuid4().hex[:8]}"
    console = orig.dir / "console-overlay.log"
    dom = libvirt_conn.defineXML(guest_xml(name, guest_build, overlay, console))
    try:
        dom.create()
        booted = Guest.attach(libvirt_conn, name)
        booted.console = console
        booted.wait_agent(120)
        assert booted.sh(f"cat {DATA_MOUNT}/marker").encode() == MARKER
        assert booted.sh(f"cat {DATA_MOUNT}/second") == SECOND
        assert booted.sh(f"test -e {DATA_MOUNT}/third && echo yes || echo no").strip() == "no"
        booted.write_file(f"{DATA_MOUNT}/new", "written on the overlay")
        booted.sync()
    finally:
        if dom.isActive():
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    _cli("virtnbdrestore", "-i", str(folder), "-a", "verify")       # the set did not change
