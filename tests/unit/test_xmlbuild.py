"""Backup and checkpoint XML builders; domain XML parsing."""
from __future__ import annotations

from lxml import etree

from virtnbd.virt import domainxml, xmlbuild


def test_full_backup_xml() -> None:
    xml = xmlbuild.backup_xml("/tmp/x/s.sock", [xmlbuild.BackupDisk("sda", "/tmp/x/sda.qcow2")], skipped=["sdb"])
    root = etree.fromstring(xml.encode())
    assert root.tag == "domainbackup" and root.get("mode") == "pull"
    assert root.find("incremental") is None
    server = root.find("server")
    assert server.get("transport") == "unix" and server.get("socket") == "/tmp/x/s.sock"
    sda, sdb = root.findall("./disks/disk")
    assert (sda.get("name"), sda.get("backup"), sda.get("exportname")) == ("sda", "yes", "sda")
    assert sda.get("backupmode") is None
    assert sda.find("scratch").get("file") == "/tmp/x/sda.qcow2"
    assert (sdb.get("name"), sdb.get("backup")) == ("sdb", "no")
    assert xmlbuild.backup_socket(xml) == "/tmp/x/s.sock"


def test_incremental_backup_xml_with_whole_raw_disk() -> None:
    xml = xmlbuild.backup_xml("/s", [xmlbuild.BackupDisk("sda", "/a"), xmlbuild.BackupDisk("vdb", "/b", full=True)],
                              incremental="virtnbdbackup.2")
    root = etree.fromstring(xml.encode())
    assert root.findtext("incremental") == "virtnbdbackup.2"
    sda, vdb = root.findall("./disks/disk")
    assert sda.get("backupmode") is None
    assert vdb.get("backupmode") == "full"
    assert sda.get("exportbitmap") == "backup-sda"


def test_checkpoint_xml() -> None:
    xml = xmlbuild.checkpoint_xml("virtnbdbackup.3", ["sda"], ["vdb", "sdc"])
    root = etree.fromstring(xml.encode())
    assert root.findtext("name") == "virtnbdbackup.3"
    disks = {d.get("name"): d.get("checkpoint") for d in root.findall("./disks/disk")}
    assert disks == {"sda": "bitmap", "vdb": "no", "sdc": "no"}


def test_checkpoint_sizes() -> None:
    xml = "<domaincheckpoint><disks><disk name='sda' checkpoint='bitmap' size='1048576'/>" \
          "<disk name='sdb' checkpoint='no'/></disks></domaincheckpoint>"
    assert xmlbuild.checkpoint_sizes(xml) == {"sda": 1048576}


def test_bitmap_context() -> None:
    assert xmlbuild.bitmap_context("vda") == "qemu:dirty-bitmap:backup-vda"


DOMAIN = """<domain type='qemu'><name>d1</name><uuid>0f1e2d3c-0000-4000-8000-000000000001</uuid>
<os><type>hvm</type><loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>
<nvram>/var/lib/libvirt/qemu/nvram/d1_VARS.fd</nvram><kernel>/boot/vmlinuz</kernel><initrd>/boot/initrd</initrd></os>
<devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/img/a.qcow2'/>
  <target dev='sda' bus='sata'/></disk>
<disk type='file' device='cdrom'><driver name='qemu' type='raw'/><source file='/iso/x.iso'/>
  <target dev='sdb' bus='sata'/></disk>
<disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/vg/lv'/>
  <target dev='vda' bus='virtio'/></disk>
<disk type='network' device='disk'><driver name='qemu' type='raw'/>
  <source protocol='rbd' name='pool/img'><host name='10.0.0.1' port='6789'/></source>
  <target dev='vdb' bus='virtio'/></disk>
<disk type='file' device='floppy'><target dev='fda' bus='fdc'/></disk>
<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
</devices></domain>"""


def test_parse_disks_skips_cdrom_and_floppy() -> None:
    disks = domainxml.parse_disks(DOMAIN)
    assert [d.target for d in disks] == ["sda", "vda", "vdb"]
    sda, vda, vdb = disks
    assert (sda.format, sda.source_type, sda.path, sda.bus, sda.can_checkpoint) == \
        ("qcow2", "file", "/img/a.qcow2", "sata", True)
    assert (vda.format, vda.source_type, vda.path, vda.can_checkpoint) == ("raw", "block", "/dev/vg/lv", False)
    assert (vdb.source_type, vdb.protocol, vdb.name, vdb.hosts) == ("network", "rbd", "pool/img", ("10.0.0.1:6789",))


def test_parse_boot_files() -> None:
    boot = domainxml.parse_boot_files(DOMAIN, tpm_root="/tpm")
    assert boot.loader == "/usr/share/OVMF/OVMF_CODE.fd"
    assert boot.nvram == "/var/lib/libvirt/qemu/nvram/d1_VARS.fd"
    assert (boot.kernel, boot.initrd) == ("/boot/vmlinuz", "/boot/initrd")
    assert boot.tpm_state == "/tpm/0f1e2d3c-0000-4000-8000-000000000001"
    assert domainxml.domain_identity(DOMAIN) == ("d1", "0f1e2d3c-0000-4000-8000-000000000001")


def test_pending_checkpoint_xml_is_saved_as_the_chains_root() -> None:
    pending = ("<domaincheckpoint><name>virtnbdbackup.pending</name><parent><name>virtnbdbackup.4</name></parent>"
               "<creationTime>1</creationTime><disks><disk name='sda' checkpoint='bitmap' "
               "bitmap='virtnbdbackup.pending' size='4096'/><disk name='sdb' checkpoint='no'/></disks>"
               "<domain type='qemu'><name>d</name></domain></domaincheckpoint>")
    root = etree.fromstring(xmlbuild.renamed_checkpoint_xml(pending, "virtnbdbackup.0").encode())
    assert root.findtext("name") == "virtnbdbackup.0" and root.find("parent") is None
    assert [dict(d.attrib) for d in root.findall("disks/disk")] == [
        {"name": "sda", "checkpoint": "bitmap", "bitmap": "virtnbdbackup.0"}, {"name": "sdb", "checkpoint": "no"}]
    assert root.findtext("domain/name") == "d"                 # the domain XML inside stays
