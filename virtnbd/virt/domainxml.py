"""Facts read from a domain's XML: disks to back up and boot/firmware files to save."""
from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from virtnbd import errors

SKIPPED_DEVICES = ("cdrom", "floppy")


@dataclass(frozen=True)
class Disk:
    target: str                     # "sda"
    bus: str                        # "sata", "virtio", "scsi"
    format: str                     # driver type: "qcow2", "raw"
    source_type: str                # "file", "block", "network", "volume"
    path: str | None                # file or block device path
    protocol: str | None = None     # network disks: "rbd", "nbd", ...
    name: str | None = None         # network disks: "pool/image"
    hosts: tuple[str, ...] = ()     # network disks: "host:port"
    device: str = "disk"            # "disk" | "lun"

    @property
    def can_checkpoint(self) -> bool:
        """Only qcow2 images can carry the persistent bitmaps incrementals need."""
        return self.format == "qcow2"


@dataclass(frozen=True)
class BootFiles:
    loader: str | None = None
    nvram: str | None = None
    kernel: str | None = None
    initrd: str | None = None
    tpm_state: str | None = None    # folder of the emulated TPM's state

    def present(self) -> dict[str, str]:
        return {k: v for k, v in vars(self).items() if v}


def _parse(xml: str) -> etree._Element:
    try:
        return etree.fromstring(xml.encode())
    except etree.XMLSyntaxError as err:
        raise errors.LibvirtError(reason=f"unreadable domain XML: {err}") from err


def _disk(el: etree._Element) -> Disk | None:
    device = el.get("device", "disk")
    if device in SKIPPED_DEVICES:
        return None
    target = el.find("target")
    if target is None or not target.get("dev"):
        return None
    driver = el.find("driver")
    fmt = (driver.get("type") if driver is not None else None) or "raw"
    source = el.find("source")
    stype = el.get("type", "file")
    path = protocol = name = None
    hosts: tuple[str, ...] = ()
    if source is not None:
        path = source.get("file") or source.get("dev") or source.get("volume")
        if stype == "network":
            protocol = source.get("protocol")
            name = source.get("name")
            hosts = tuple(
                f"{h.get('name', '')}:{h.get('port', '')}".rstrip(":") for h in source.findall("host")
            )
    return Disk(
        target=str(target.get("dev")), bus=target.get("bus", ""), format=fmt, source_type=stype,
        path=path, protocol=protocol, name=name, hosts=hosts, device=device,
    )


def parse_disks(xml: str) -> list[Disk]:
    """Disks of the domain in XML order; cdrom and floppy are left out."""
    root = _parse(xml)
    disks = [_disk(el) for el in root.findall("./devices/disk")]
    return [d for d in disks if d is not None]


def parse_boot_files(xml: str, tpm_root: str = "/var/lib/libvirt/swtpm") -> BootFiles:
    root = _parse(xml)
    uuid = root.findtext("uuid")
    tpm_state = None
    for tpm in root.findall("./devices/tpm"):
        backend = tpm.find("backend")
        if backend is not None and backend.get("type") == "emulator" and uuid:
            tpm_state = f"{tpm_root}/{uuid}"
    return BootFiles(
        loader=root.findtext("./os/loader") or None,
        nvram=root.findtext("./os/nvram") or None,
        kernel=root.findtext("./os/kernel") or None,
        initrd=root.findtext("./os/initrd") or None,
        tpm_state=tpm_state,
    )


def domain_identity(xml: str) -> tuple[str, str]:
    """(name, uuid) from the XML."""
    root = _parse(xml)
    return root.findtext("name") or "", root.findtext("uuid") or ""
