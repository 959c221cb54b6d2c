"""Pure builders of the XML documents a backup job needs (pull mode, and push mode for ``--push``)."""
from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from lxml import etree


@dataclass(frozen=True)
class BackupDisk:
    target: str
    scratch: str                  # scratch file (qcow2) libvirt creates for the fleecing image
    full: bool = False            # force a full export of this disk inside an incremental job


@dataclass(frozen=True)
class TcpServer:
    """The job's NBD server on TCP: ``name`` is the address QEMU listens on (on the domain's host)."""

    name: str
    port: int
    tls: bool = True


def export_name(target: str) -> str:
    return target


def bitmap_context(target: str) -> str:
    """The NBD metadata context holding the job's dirty bitmap for ``target``."""
    return f"qemu:dirty-bitmap:backup-{target}"


def _tostring(root: etree._Element) -> str:
    return etree.tostring(root, pretty_print=True, encoding="unicode")


def backup_xml(
    socket: str | TcpServer,
    disks: Sequence[BackupDisk],
    skipped: Collection[str] = (),
    incremental: str | None = None,
) -> str:
    """``<domainbackup mode='pull'>`` exporting ``disks`` on a unix socket (or TCP, TLS by default).

    ``incremental`` names the checkpoint the dirty bitmaps are relative to;
    disks with ``full=True`` are exported whole even then (``backupmode='full'``).
    """
    root = etree.Element("domainbackup", mode="pull")
    if incremental:
        etree.SubElement(root, "incremental").text = incremental
    if isinstance(socket, TcpServer):
        etree.SubElement(root, "server", transport="tcp", tls="yes" if socket.tls else "no", name=socket.name,
                         port=str(socket.port))
    else:
        etree.SubElement(root, "server", transport="unix", socket=os.fspath(socket))
    el_disks = etree.SubElement(root, "disks")
    for disk in disks:
        attrs = {"name": disk.target, "backup": "yes", "type": "file", "exportname": export_name(disk.target),
                 "exportbitmap": f"backup-{disk.target}"}
        if incremental and disk.full:
            attrs["backupmode"] = "full"
        el = etree.SubElement(el_disks, "disk", attrs)
        etree.SubElement(el, "driver", type="qcow2")
        etree.SubElement(el, "scratch", file=os.fspath(disk.scratch))
    for target in skipped:
        etree.SubElement(el_disks, "disk", name=target, backup="no")
    return _tostring(root)


@dataclass(frozen=True)
class PushDisk:
    target: str
    file: str                     # image QEMU writes into; pre-created by us (REUSE_EXTERNAL)
    full: bool = False            # copy this disk whole inside an incremental job


def push_backup_xml(disks: Sequence[PushDisk], skipped: Collection[str] = (), incremental: str | None = None) -> str:
    """``<domainbackup mode='push'>``: QEMU writes each disk into its pre-created qcow2 ``file``.

    The job is started with ``VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL`` (libvirt opens our image,
    an overlay keeps its backing name); ``incremental`` as in :func:`backup_xml`.
    """
    root = etree.Element("domainbackup", mode="push")
    if incremental:
        etree.SubElement(root, "incremental").text = incremental
    el_disks = etree.SubElement(root, "disks")
    for disk in disks:
        attrs = {"name": disk.target, "backup": "yes", "type": "file"}
        if incremental and disk.full:
            attrs["backupmode"] = "full"
        el = etree.SubElement(el_disks, "disk", attrs)
        etree.SubElement(el, "target", file=os.fspath(disk.file))
        etree.SubElement(el, "driver", type="qcow2")
    for target in skipped:
        etree.SubElement(el_disks, "disk", name=target, backup="no")
    return _tostring(root)


def push_targets(xml: str) -> list[str]:
    """The image files a running push job writes (empty for a pull job)."""
    root = etree.fromstring(xml.encode())
    if root.get("mode") != "push":
        return []
    return [str(el.get("file")) for el in root.findall("./disks/disk/target") if el.get("file")]


def checkpoint_xml(
    name: str,
    bitmap_disks: Collection[str],
    other_disks: Collection[str] = (),
    description: str = "virtnbdbackup checkpoint",
) -> str:
    """``<domaincheckpoint>`` tracking ``bitmap_disks``; every other disk explicitly ``checkpoint='no'``."""
    root = etree.Element("domaincheckpoint")
    etree.SubElement(root, "name").text = name
    etree.SubElement(root, "description").text = description
    el_disks = etree.SubElement(root, "disks")
    for target in bitmap_disks:
        etree.SubElement(el_disks, "disk", name=target, checkpoint="bitmap")
    for target in other_disks:
        etree.SubElement(el_disks, "disk", name=target, checkpoint="no")
    return _tostring(root)


def backup_socket(xml: str) -> str | None:
    """The unix socket a running job's XML exports on; for a TCP job its first scratch file (None: neither)."""
    root = etree.fromstring(xml.encode())
    server = root.find("server")
    if server is not None and server.get("socket"):
        return server.get("socket")
    scratch = root.find("./disks/disk/scratch")
    return scratch.get("file") if scratch is not None else None


def checkpoint_sizes(xml: str) -> dict[str, int]:
    """Per-disk dirty size from checkpoint XML fetched with the SIZE flag."""
    root = etree.fromstring(xml.encode())
    sizes: dict[str, int] = {}
    for disk in root.findall("./disks/disk"):
        size = disk.get("size")
        if size is not None and disk.get("name"):
            sizes[str(disk.get("name"))] = int(size)
    return sizes


def renamed_checkpoint_xml(xml: str, name: str) -> str:
    """A checkpoint's XML under another name, its bitmaps renamed alike, without a parent (a chain's root)."""
    root = etree.fromstring(xml.encode())
    for el in root.findall("name"):
        el.text = name
    for el in root.findall("parent"):
        root.remove(el)
    for disk in root.findall("disks/disk"):
        if disk.get("checkpoint") == "bitmap":
            disk.set("bitmap", name)
        if "size" in disk.attrib:
            del disk.attrib["size"]
    return _tostring(root)
