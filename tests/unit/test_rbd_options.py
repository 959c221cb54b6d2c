"""RBD option parsing and XML helpers (pure logic)."""
from __future__ import annotations

import pytest
from lxml import etree

from virtnbd import errors, rbdconn
from virtnbd.cli import rbdargs
from virtnbd.cli.restore import parse
from virtnbd.restore.rbdxml import make_network_disk, mon_hosts
from virtnbd.restore.targets.rbd import explicit_targets, parse_features, parse_object_size


def test_parse_spec() -> None:
    assert rbdconn.parse_spec("rbd:pool/img") == rbdconn.ImageSpec("pool", "img")
    assert str(rbdconn.parse_spec("pool/img.1")) == "rbd:pool/img.1"
    for bad in ("rbd:pool", "rbd:/img", "rbd:pool/", "rbd:po ol/img"):
        with pytest.raises(errors.UsageError):
            rbdconn.parse_spec(bad)


def test_features_and_object_size() -> None:
    assert parse_features("layering, exclusive-lock") == ("layering", "exclusive-lock")
    with pytest.raises(errors.UsageError, match="unknown RBD feature"):
        parse_features("layering,warp")
    assert parse_object_size("4M") == 4 << 20
    assert parse_object_size("64KiB") == 64 << 10
    assert parse_object_size("1048576") == 1 << 20
    for bad in ("3M", "1K", "2G", "x"):
        with pytest.raises(errors.UsageError):
            parse_object_size(bad)


def test_targets() -> None:
    assert rbdargs.parse_targets(["rbd:p/i"]) == (("", "rbd:p/i"),)
    assert explicit_targets((("", "rbd:p/i"),), ["sda"]) == {"sda": "rbd:p/i"}
    with pytest.raises(errors.UsageError, match="2 disks are restored"):
        explicit_targets((("", "rbd:p/i"),), ["sda", "sdb"])
    with pytest.raises(errors.UsageError, match="each needs DISK="):
        rbdargs.parse_targets(["rbd:p/a", "sdb=rbd:p/b"])
    with pytest.raises(errors.UsageError, match="given twice"):
        rbdargs.parse_targets(["sda=rbd:p/a", "sda=rbd:p/b"])
    with pytest.raises(errors.UsageError):
        rbdargs.parse_targets(["sda=/tmp/x.qcow2"])


def test_cli_builds_rbd_options() -> None:
    o = parse(["-i", "/b", "--target", "sda=rbd:vol/vm", "--ceph-conf", "/c.conf", "--ceph-id", "backup",
               "--ceph-keyring", "/k", "--ceph-timeout", "7", "--rbd-features", "layering", "--rbd-object-size",
               "8M", "--overwrite", "--rbd-snapshot"])
    assert o.output is None and o.targets == (("sda", "rbd:vol/vm"),)
    assert o.rbd.ceph == rbdconn.CephOptions(conf="/c.conf", client_id="backup", keyring="/k", connect_timeout=7)
    assert (o.rbd.features, o.rbd.object_size, o.rbd.overwrite, o.rbd.snapshot) == (("layering",), 8 << 20, True, True)
    with pytest.raises(errors.UsageError, match="--ceph-timeout"):
        parse(["-i", "/b", "-o", "rbd:vol", "--ceph-timeout", "0"])


def test_mon_hosts() -> None:
    assert mon_hosts("[v2:10.0.0.1:3300,v1:10.0.0.1:6789],[v2:10.0.0.2:3300,v1:10.0.0.2:6789]") == [
        ("10.0.0.1", "6789"), ("10.0.0.2", "6789")]
    assert mon_hosts("10.0.0.1:6789, mon2") == [("10.0.0.1", "6789"), ("mon2", None)]
    assert mon_hosts("v2:10.0.0.3:3300") == [("10.0.0.3", "3300")]


def test_network_disk_keeps_rbd_auth_and_replaces_file_source() -> None:
    opts = rbdconn.CephOptions(client_id="backup")
    file_disk = etree.fromstring("<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                                 "<source file='/x.qcow2'/><target dev='vda'/></disk>")
    make_network_disk(file_disk, "rbd:vol/vm", opts, mon_host="10.0.0.1:6789")
    assert file_disk.get("type") == "network" and file_disk.find("driver").get("type") == "raw"
    source = file_disk.find("source")
    assert (source.get("protocol"), source.get("name")) == ("rbd", "vol/vm")
    assert source.find("host").attrib == {"name": "10.0.0.1", "port": "6789"}
    assert source.find("auth/secret").get("usage") == "client.backup secret"
    rbd_disk = etree.fromstring("<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
                                "<auth username='admin'><secret type='ceph' uuid='u-1'/></auth>"
                                "<source protocol='rbd' name='old/img'/><target dev='vda'/></disk>")
    make_network_disk(rbd_disk, "rbd:new/img", opts, mon_host="m1")
    assert rbd_disk.find("source/auth/secret").get("uuid") == "u-1"
    assert rbd_disk.find("source").get("name") == "new/img" and rbd_disk.find("auth") is None
