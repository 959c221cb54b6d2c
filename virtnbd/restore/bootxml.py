"""Domain XML for booting a backup point without restoring it first (``-a instant`` and ``-a drill``).

Pure functions over the saved domain XML, after :func:`virtnbd.restore.config.adjust`
(new name, no UUID, new MACs, disks not booted left out): each disk becomes a
local qcow2 overlay whose backing is the NBD export of that disk at the point,
given in the XML (``<backingStore type='network'>``) so the overlay's header
names no socket; file-backed serial consoles are redirected into ``console_dir``
(two domains must not write one log); ``isolated`` drops every network card.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from lxml import etree

from virtnbd.restore import config
from virtnbd.restore.config import _parse


@dataclass(frozen=True)
class OverlayDisk:
    dev: str            # target dev (vda)
    overlay: str        # local qcow2 overlay the guest writes into
    socket: str         # unix socket of the NBD export serving the point


def overlay_xml(xml: str, disks: Mapping[str, OverlayDisk], console_dir: str, *, isolated: bool = False) -> str:
    """``xml`` (already adjusted) with overlay disks backed by NBD exports."""
    root = _parse(xml)
    devices = root.find("devices")
    if devices is None:
        return etree.tostring(root, encoding="unicode")
    for disk in devices.findall("disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev in disks:
            _to_overlay(disk, disks[str(dev)])
    _redirect_consoles(devices, console_dir, root.findtext("name") or "domain")
    if isolated:
        for nic in devices.findall("interface"):
            devices.remove(nic)
    return etree.tostring(root, encoding="unicode")


def _to_overlay(disk: etree._Element, spec: OverlayDisk) -> None:
    source = config.file_source(disk, spec.overlay, "qcow2")
    backing = etree.Element("backingStore", type="network")
    etree.SubElement(backing, "format", type="raw")
    nbd = etree.SubElement(backing, "source", protocol="nbd")
    etree.SubElement(nbd, "host", transport="unix", socket=os.path.abspath(spec.socket))
    etree.SubElement(backing, "backingStore")          # the chain ends at the export
    source.addnext(backing)


def _redirect_consoles(devices: etree._Element, console_dir: str, name: str) -> None:
    for n, dev in enumerate(devices.findall("serial") + devices.findall("console")):
        source = dev.find("source")
        if dev.get("type") == "file" and source is not None and source.get("path"):
            source.set("path", os.path.join(os.path.abspath(console_dir), f"{name}.console{n}.log"))


def console_files(xml: str) -> list[str]:
    """Paths of the file-backed serial consoles of ``xml``."""
    root = _parse(xml)
    return [str(p) for p in root.xpath("devices/serial[@type='file']/source/@path")]


def nbd_sockets(xml: str) -> list[str]:
    """Unix sockets of every NBD backing in a (live) domain XML: empty once every disk switched over."""
    root = _parse(xml)
    return [str(s) for s in root.xpath("devices/disk//source[@protocol='nbd']/host/@socket")]


def block_copy_dest(path: str, fmt: str) -> str:
    """The ``<disk>`` XML naming a block copy's destination file (libvirt creates it)."""
    disk = etree.Element("disk", type="file")
    etree.SubElement(disk, "driver", name="qemu", type=fmt)
    etree.SubElement(disk, "source", file=os.path.abspath(path))
    return etree.tostring(disk, encoding="unicode")
