"""A small, independent writer of virtnbdbackup backup sets, for test fixtures.

Written from docs/LEGACY_FORMAT.md (sparse stream versions 1 and 2,
uncompressed or lz4 with the compressed-size trailer, single and chunked
entries; folder layout with ``<domain>.cpt``, ``checkpoints/``,
``vmconfig.*.xml`` and ``.chksum``). It shares no code with the reader.
"""
from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lz4.frame

Extent = tuple[str, int, Any]     # ("data", offset, bytes) | ("zero", offset, length)


def frame(kind: bytes, start: int, length: int) -> bytes:
    return b"%s %016x %016x\r\n" % (kind, start, length)


def meta_json(version: int, virtual_size: int, data_size: int, *, disk: str, checkpoint: str, parent: str,
              incremental: bool, compressed: bool | int, disk_format: str = "qcow2",
              date: str = "2023-05-04T10:11:12.131415") -> bytes:
    meta: dict[str, Any] = {"virtualSize": virtual_size, "dataSize": data_size, "date": date, "diskName": disk,
                            "checkpointName": checkpoint, "parentCheckpoint": parent, "incremental": incremental}
    if version == 1:
        meta["stream-version"] = 1
    else:
        meta.update({"diskFormat": disk_format, "compressed": compressed, "compressionMethod": "lz4",
                     "streamVersion": 2})
    return json.dumps(meta, indent=4).encode()


def stream_bytes(extents: Sequence[Extent], *, virtual_size: int, disk: str = "sda",
                 checkpoint: str = "virtnbdbackup.0", parent: str = "", incremental: bool = False,
                 version: int = 2, compress: bool = False, max_request: int = 32 << 20,
                 disk_format: str = "qcow2") -> bytes:
    """One sparse stream, as virtnbdbackup lays it out on disk."""
    data_size = sum(len(v) for k, _, v in extents if k == "data")
    head = meta_json(version, virtual_size, data_size, disk=disk, checkpoint=checkpoint, parent=parent,
                     incremental=incremental, compressed=2 if compress else False, disk_format=disk_format)
    out = bytearray(frame(b"meta", 0, len(head)) + head + b"\r\n")
    trailer: list[Any] = []
    for kind, offset, value in extents:
        if kind == "zero":
            out += frame(b"zero", offset, value)
            continue
        out += frame(b"data", offset, len(value))
        if not compress:
            out += value
        elif len(value) >= max_request:          # chunked entry: one lz4 frame per request-sized piece
            sizes = []
            for i in range(0, len(value), max_request):
                packed = lz4.frame.compress(value[i:i + max_request], content_checksum=True, block_checksum=True)
                out += packed
                sizes.append(len(packed))
            trailer.append({sum(sizes): sizes})
        else:
            packed = lz4.frame.compress(value, content_checksum=True, block_checksum=True)
            out += packed
            trailer.append(len(packed))
        out += b"\r\n"
    out += frame(b"stop", 0, 0)
    if compress:
        body = json.dumps(trailer).encode()
        out += body + b"\r\n" + frame(b"comp", 0, len(body))
    return bytes(out)


def write_stream(path: Path, data: bytes, chksum: bool = True) -> None:
    path.write_bytes(data)
    if chksum:
        Path(f"{path}.chksum").write_text(str(zlib.adler32(data, 1)))


@dataclass
class LegacyPoint:
    level: str                                   # copy | full | inc | diff
    extents: dict[str, list[Extent]]            # disk -> extents
    ident: str = ""                              # diff: epoch; others: derived
    compress: bool = False
    version: int = 2
    max_request: int = 32 << 20
    disks_size: dict[str, int] = field(default_factory=dict)


def domain_xml(domain: str, uuid: str, disks: Sequence[str]) -> str:
    devs = "".join(f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
                   f"<source file='/var/lib/libvirt/images/{domain}-{d}.qcow2'/><target dev='{d}' bus='sata'/></disk>"
                   for d in disks)
    return f"<domain type='kvm'><name>{domain}</name><uuid>{uuid}</uuid><devices>{devs}</devices></domain>"


def write_set(folder: Path, domain: str, uuid: str, points: Sequence[LegacyPoint], virtual_size: int) -> None:
    """A backup folder as a sequence of virtnbdbackup runs would leave it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "checkpoints").mkdir(exist_ok=True)
    checkpoints: list[str] = []
    for point in points:
        parent = checkpoints[-1] if point.level in ("inc", "diff") else ""
        if point.level == "full":
            checkpoints = []
        name = f"virtnbdbackup.{len(checkpoints)}"
        for disk, extents in point.extents.items():
            if point.level in ("full", "copy"):
                fname = f"{disk}.{point.level}.data"
            elif point.level == "inc":
                fname = f"{disk}.inc.{name}.data"
            else:
                fname = f"{disk}.diff.{point.ident}.data"
            data = stream_bytes(extents, virtual_size=virtual_size, disk=disk, checkpoint=name, parent=parent,
                                incremental=point.level in ("inc", "diff"), version=point.version,
                                compress=point.compress, max_request=point.max_request)
            write_stream(folder / fname, data)
        ident = {"copy": "copy", "diff": point.ident}.get(point.level, name)
        (folder / f"vmconfig.{ident}.xml").write_text(domain_xml(domain, uuid, list(point.extents)))
        if point.level in ("full", "inc"):
            (folder / "checkpoints" / f"{name}.xml").write_text(
                f"<domaincheckpoint><name>{name}</name>"
                + (f"<parent><name>{parent}</name></parent>" if parent else "") + "</domaincheckpoint>")
            checkpoints.append(name)
            (folder / f"{domain}.cpt").write_text(json.dumps(checkpoints))
