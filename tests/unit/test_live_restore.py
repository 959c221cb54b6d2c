"""Pure parts of -a instant / -a drill: the overlay XML, the options, and the guard's kill path
(run for real against libvirt's built-in test driver)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from virtnbd import errors
from virtnbd.cli import restore
from virtnbd.restore import bootxml

SAVED = """<domain type='qemu'><name>web</name><uuid>0b6f6a6e-93c3-4a53-a0d1-2f6c1d3c5a11</uuid>
<devices>
  <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/img/web.raw'/>
    <target dev='vda' bus='virtio'/></disk>
  <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='sdc' bus='sata'/></disk>
  <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/></interface>
  <serial type='file'><source path='/var/log/web.log'/><target port='0'/></serial>
</devices></domain>"""


def _overlay(isolated: bool) -> etree._Element:
    disks = {"vda": bootxml.OverlayDisk("vda", "/w/vda.overlay.qcow2", "/s/vda.sock")}
    return etree.fromstring(bootxml.overlay_xml(SAVED, disks, "/w", isolated=isolated).encode())


def test_each_disk_is_an_overlay_backed_by_its_export() -> None:
    root = _overlay(isolated=False)
    disk = root.find("devices/disk[@device='disk']")
    assert disk.find("driver").get("type") == "qcow2"
    assert disk.find("source").get("file") == "/w/vda.overlay.qcow2"
    backing = disk.find("backingStore")
    assert backing.get("type") == "network" and backing.find("format").get("type") == "raw"
    assert backing.find("source").get("protocol") == "nbd"
    assert backing.find("source/host").attrib == {"transport": "unix", "socket": "/s/vda.sock"}
    assert len(backing.find("backingStore")) == 0                    # the chain ends at the export
    assert root.find("devices/disk[@device='cdrom']/source").get("file") == "/iso/x.iso"
    assert root.find("devices/serial/source").get("path") == "/w/web.console0.log"   # never the original's log
    assert root.findall("devices/interface")
    assert bootxml.nbd_sockets(etree.tostring(root, encoding="unicode")) == ["/s/vda.sock"]


def test_isolated_drops_every_network_card() -> None:
    assert not _overlay(isolated=True).findall("devices/interface")


def test_after_the_switch_over_no_socket_is_left() -> None:
    assert bootxml.nbd_sockets(SAVED) == []
    dest = etree.fromstring(bootxml.block_copy_dest("out/vda.qcow2", "qcow2").encode())
    assert dest.find("driver").get("type") == "qcow2" and dest.find("source").get("file").endswith("/out/vda.qcow2")


def test_live_options() -> None:
    opts = restore.parse(["-i", "/s", "-a", "instant", "-o", "/o", "-N", "x", "--bandwidth", "5", "--paused"])
    assert (opts.action, opts.name, opts.bandwidth, opts.paused) == ("instant", "x", 5, True)
    assert restore.parse(["-i", "/s", "-a", "instant", "--no-migrate"]).no_migrate   # no -o needed: no copy
    drill = restore.parse(["-i", "/s", "-a", "drill", "--check", "true", "--json", "--boot-timeout", "30"])
    assert (drill.check, drill.json, drill.boot_timeout) == ("true", True, 30.0)


@pytest.mark.parametrize("argv", [
    ["-a", "instant"],                                   # no output folder
    ["-a", "instant", "-o", "-"],
    ["-a", "instant", "-o", "/o", "-s", "/s/a.data"],
    ["-a", "drill", "--paused"],
    ["-a", "drill", "--bandwidth", "3"],
    ["-o", "/o", "--check", "true"],                     # drill option on a restore
    ["-a", "instant", "-o", "/o", "--bandwidth", "0"],
    ["-a", "drill", "--boot-timeout", "0"],
    ["-a", "drill", "-D"],
    ["-a", "drill", "--no-migrate"],
    ["-a", "instant", "--no-migrate", "--bandwidth", "2"],
    ["-o", "/o", "--no-migrate"],
])
def test_live_options_refused(argv: list[str]) -> None:
    with pytest.raises(errors.UsageError):
        restore.parse(["-i", "/s", *argv])


def test_live_refuses_s3_sets() -> None:
    with pytest.raises(errors.UsageError, match="local backup set"):
        restore.parse(["-i", "s3://bucket/set", "-a", "drill"])


def _guard(plan: dict[str, object], tail: bytes) -> subprocess.CompletedProcess[bytes]:
    data = json.dumps(plan).encode() + b"\n" + tail
    return subprocess.run([sys.executable, "-m", "virtnbd.restore.guard"], input=data, capture_output=True,
                          timeout=60, check=False)


def test_guard_cleans_up_when_the_command_dies(tmp_path: Path) -> None:
    work, partial = tmp_path / "work", tmp_path / "vda.qcow2"
    work.mkdir()
    partial.write_bytes(b"half")
    plan = {"uri": "test:///default", "domain": "no-such-domain", "persistent": True,
            "remove": [str(partial)], "folders": [str(work)]}
    kept = _guard(plan, b"done\n")                       # the command cleaned up itself: nothing touched
    assert kept.returncode == 0 and work.exists() and partial.exists() and not kept.stderr
    died = _guard(plan, b"")                             # end of input without done: killed
    assert died.returncode == 0 and not work.exists()
    assert b"killed before the switch-over: domain no-such-domain was not created" in died.stderr
    assert partial.exists()                              # only removed together with the domain it belonged to


def test_guard_never_stops_a_domain_that_switched_over(tmp_path: Path) -> None:
    """libvirt's test driver runs a domain 'test' reading no NBD socket: as after the switch-over it is left
    running and its images stay (the destroy path is proven on real QEMU by the SIGKILL system test)."""
    final = tmp_path / "vda.qcow2"
    final.write_bytes(b"complete")
    plan = {"uri": "test:///default", "domain": "test", "persistent": True, "remove": [str(final)],
            "folders": []}
    died = _guard(plan, b"")
    assert b"domain test had switched over to its final images: left running" in died.stderr, died.stderr
    assert final.exists()
