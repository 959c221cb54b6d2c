"""Adjust the backed-up domain XML so it boots the restored disks (``-c``), and define it (``-D``).

Changes: new name (default ``restore_<name>``), no UUID (libvirt makes one),
restored disks as file disks with the output path and a driver type matching
the output format, disks that were not restored removed (so the copy never
writes to the original's images), NVRAM copied from the backup set to a new
path, new MAC addresses on every interface.
"""
from __future__ import annotations

import glob
import logging
import os
import random
from collections.abc import Mapping, Sequence
from typing import Any

from lxml import etree

from virtnbd import errors
from virtnbd.fsutil import save_atomic
from virtnbd.restore.source import boot_file_of, domain_xml_of, side_file_bytes
from virtnbd.restore.targets import host_path

log = logging.getLogger(__name__)


def new_mac(rng: random.Random | None = None) -> str:
    """A random address in QEMU's locally administered 52:54:00 range."""
    r = rng or random.SystemRandom()
    return "52:54:00:" + ":".join(f"{r.randrange(256):02x}" for _ in range(3))


def _parse(xml: str) -> Any:
    try:
        return etree.fromstring(xml.encode(), parser=etree.XMLParser(resolve_entities=False, no_network=True))
    except etree.XMLSyntaxError as err:
        raise errors.RestoreError(reason=f"domain XML in the backup set is not valid XML: {err}") from err


def adjust(xml: str, name: str, disks: Mapping[str, tuple[str, str]], nvram: str | None = None,
           rng: random.Random | None = None, *, ceph: Any = None) -> str:
    """The adjusted XML. ``disks`` maps target dev -> (restored path or rbd:POOL/IMAGE, format).

    ``ceph`` (rbdconn.CephOptions) says which cluster rbd: targets live on."""
    root = _parse(xml)
    name_el = root.find("name")
    if name_el is None:
        name_el = etree.SubElement(root, "name")
    name_el.text = name
    for uuid in root.findall("uuid"):
        root.remove(uuid)
    if "id" in root.attrib:
        del root.attrib["id"]
    devices = root.find("devices")
    if devices is not None:
        _adjust_disks(devices, disks, ceph)
        for mac in devices.findall("interface/mac"):
            mac.set("address", new_mac(rng))
    nvram_el = root.find("os/nvram")
    if nvram_el is not None:
        if nvram:
            nvram_el.text = nvram
            if "template" in nvram_el.attrib:
                del nvram_el.attrib["template"]
        else:
            parent = nvram_el.getparent()
            if parent is not None:
                parent.remove(nvram_el)  # libvirt makes a fresh one from the template
    return etree.tostring(root, encoding="unicode")


def _adjust_disks(devices: Any, disks: Mapping[str, tuple[str, str]], ceph: Any = None) -> None:
    for disk in devices.findall("disk"):
        if disk.get("device", "disk") not in ("disk", "lun"):
            continue
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        if dev is None or dev not in disks:
            log.warning("disk %s was not restored: left out of the adjusted domain XML", dev)
            devices.remove(disk)
            continue
        path, fmt = disks[dev]
        if disk.get("device") == "lun":
            disk.set("device", "disk")
        if path.startswith("rbd:"):  # RBD target: network disk (virtnbd/restore/rbdxml.py)
            from virtnbd import rbdconn
            from virtnbd.restore.rbdxml import make_network_disk
            make_network_disk(disk, path, ceph or rbdconn.CephOptions())
            continue
        file_source(disk, path, fmt)


def file_source(disk: Any, path: str, fmt: str) -> Any:
    """Make ``disk`` a file disk of ``fmt`` at ``path`` (old sources and backing chains dropped); its <source>."""
    disk.set("type", "file")
    for old in disk.findall("source") + disk.findall("backingStore"):
        disk.remove(old)
    driver = disk.find("driver")
    if driver is None:
        driver = etree.Element("driver", name="qemu")
        disk.insert(0, driver)
    driver.set("type", fmt)
    source = etree.Element("source", file=host_path(path) or os.path.abspath(path))
    driver.addnext(source)
    return source


def _saved_nvram(folder: str, point: Any, nvram: str) -> str | None:
    saved = boot_file_of(folder, point, "nvram")
    if saved is not None:
        return saved
    base = os.path.basename(nvram)
    matches = sorted(glob.glob(os.path.join(glob.escape(folder), f"*{glob.escape(base)}*")))
    return matches[-1] if matches else None


def write_for_restore(selection: Any, restored: Sequence[Any], options: Any, host: Any = None) -> str:
    """Write ``<output>/<name>.xml`` (and the copied NVRAM); define it with ``--define``.

    ``host`` (restore/targets/remote.RemoteHost): the output folder is on that host; the XML is
    written there and the domain defined through its libvirt connection."""
    if host is not None:
        return _write_on_host(selection, restored, options, host)
    point = selection.points[-1] if selection.points else None
    xml = domain_xml_of(selection.folder, point) if point is not None else None
    if not xml:
        raise errors.RestoreError(reason="the backup set holds no domain XML for this point: cannot adjust the config")
    parsed = _parse(xml)
    old_name = parsed.findtext("name") or "domain"
    # RBD outputs (-o rbd:POOL / --target only) have no folder: the XML goes to the current one
    folder = options.output if options.output and not options.output.startswith("rbd:") else "."
    name = options.name or f"restore_{old_name}"
    nvram_copy = None
    old_nvram = parsed.findtext("os/nvram")
    if old_nvram:
        saved = _saved_nvram(selection.folder, point, old_nvram.strip())
        if saved is None:
            log.warning("NVRAM %s is not in the backup set: the adjusted XML lets libvirt create a fresh one",
                        old_nvram)
        else:
            nvram_copy = os.path.abspath(os.path.join(folder, f"{name}_VARS.fd"))
            try:
                plain = side_file_bytes(selection.bset or selection.folder, os.path.relpath(saved, selection.folder))
                if plain is None:
                    raise OSError(f"cannot read {saved}")
                save_atomic(nvram_copy, plain)
            except OSError as err:
                raise errors.StorageError(path=nvram_copy, reason=err.strerror or str(err)) from err
    disks = {r.disk: (r.target, r.format) for r in restored}
    adjusted = adjust(xml, name, disks, nvram_copy, ceph=getattr(getattr(options, "rbd", None), "ceph", None))
    path = os.path.join(folder, f"{name}.xml")
    save_atomic(path, adjusted.encode(), mode=0o644)
    log.info("adjusted domain XML: %s", path)
    if options.define:
        define(adjusted, options.uri, getattr(options, "password_file", None))
        log.info("defined domain %s", name)
    return path


def _write_on_host(selection: Any, restored: Sequence[Any], options: Any, host: Any) -> str:
    point = selection.points[-1] if selection.points else None
    xml = domain_xml_of(selection.folder, point) if point is not None else None
    if not xml:
        raise errors.RestoreError(reason="the backup set holds no domain XML for this point: cannot adjust the config")
    name = options.name or f"restore_{_parse(xml).findtext('name') or 'domain'}"
    if _parse(xml).findtext("os/nvram"):
        log.warning("NVRAM is not copied to a remote host: the adjusted XML lets libvirt there create a fresh one")
    disks = {r.disk: (r.target, r.format) for r in restored}
    adjusted = adjust(xml, name, disks, None, ceph=getattr(getattr(options, "rbd", None), "ceph", None))
    folder = options.output if options.output and not options.output.startswith("rbd:") else None
    path = os.path.join(folder, f"{name}.xml") if folder else f"{name}.xml"
    if folder:
        host.write_file(path, adjusted.encode())
    else:
        save_atomic(path, adjusted.encode(), mode=0o644)
    log.info("adjusted domain XML: %s%s", f"{host.name}:" if folder else "", path)
    if options.define:
        define(adjusted, host.libvirt_uri(), getattr(options, "password_file", None))
        log.info("defined domain %s on %s", name, host.name)
    return path


def define(xml: str, uri: str | Sequence[str], password_file: str | None = None) -> None:
    import libvirt

    from virtnbd.virt.connection import connect, reason
    with connect(uri, password_file) as conn:
        try:
            conn.defineXML(xml)
        except libvirt.libvirtError as err:
            raise errors.LibvirtError(reason=f"define: {reason(err)}") from err
