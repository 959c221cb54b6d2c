"""A domain with a real emulated TPM (libvirt's swtpm): its state folder is saved with every point."""
from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from tests.lab.libvirt_lab import DiskSpec, MiB
from tests.system.backup_helpers import ok
from tests.system.chain_helpers import write_all

pytestmark = pytest.mark.system

SWTPM_ROOT = Path("/var/lib/libvirt/swtpm")
TPM = "<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"


def _same_tree(saved: Path, source: Path) -> None:
    files = sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file())
    assert files, f"swtpm wrote no state under {source}"
    assert sorted(p.relative_to(saved) for p in saved.rglob("*") if p.is_file()) == files
    for rel in files:
        assert filecmp.cmp(saved / rel, source / rel, shallow=False), rel


def test_swtpm_state_is_saved_with_every_point(make_domain) -> None:  # type: ignore[no-untyped-def]
    import libvirt

    dom = make_domain(disks=[DiskSpec("sda", "virtio", "qcow2", 16 * MiB)], start=False)
    xml = dom.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).replace("</devices>", f"{TPM}</devices>")
    dom.dom.connect().defineXML(xml)
    dom.start()                                 # libvirt runs swtpm_setup + swtpm for the domain
    state = SWTPM_ROOT / dom.dom.UUIDString()
    assert (state / "tpm2").is_dir(), f"no swtpm state in {state}"
    folder = dom.dir / "backup"
    for level, point in (("full", "virtnbdbackup.0"), ("inc", "virtnbdbackup.1")):
        write_all(dom, 7, 3, ("data",))
        assert ok(dom, level, folder)["point"] == point
        _same_tree(folder / f"tpm.{point}", state)
