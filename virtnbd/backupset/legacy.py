"""A Manifest for a backup folder written by virtnbdbackup (abbbi/virtnbdbackup).

virtnbdbackup keeps no manifest. The chain is rebuilt from what it does keep:
the stream metadata (``checkpointName``, ``parentCheckpoint``), the
``<domain>.cpt`` list of checkpoints in creation order, and the file names.
File times are never used. Layout: docs/LEGACY_FORMAT.md.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from virtnbd import errors
from virtnbd.backupset.manifest import DiskEntry, Manifest, Point
from virtnbd.backupset.naming import checkpoint_number
from virtnbd.stream import legacy as legacy_stream
from virtnbd.stream.detect import open_stream

log = logging.getLogger(__name__)

_DATA_NAME = re.compile(r"^(?P<disk>[^./]+)\.(?:(?P<level>full|copy)|inc\.(?P<cpt>.+)|diff\.(?P<diff>.+))\.data$")
_UUID = re.compile(r"<uuid>\s*([^<\s]+)\s*</uuid>")


@dataclass(frozen=True)
class _File:
    name: str
    disk: str
    level: str
    point: str                 # point name in the derived manifest
    ident: str                 # virtnbdbackup's identifier: checkpoint name, diff ident, "copy"
    parent: str | None
    checkpoint: str | None
    time: str
    entry: DiskEntry


def load(folder: str | os.PathLike[str]) -> Manifest | None:
    """The chain of a virtnbdbackup folder as a Manifest; None if the folder holds none of its files."""
    base = Path(folder)
    try:
        names = sorted(p.name for p in base.iterdir() if p.is_file())
    except OSError as err:
        raise errors.BackupSetError(path=str(base), reason=err.strerror or str(err)) from err
    files = [f for f in (_describe(base, n) for n in names if _DATA_NAME.match(n)) if f is not None]
    if not files:
        return None
    domain, cpts = _checkpoint_list(base, names)
    points = _order(_group(base, files), cpts)
    domain_xml = next((p.domain_xml for p in reversed(points) if p.domain_xml), None)
    found = _UUID.search(domain_xml) if domain_xml else None
    uuid = found.group(1) if found else ""
    return Manifest(domain=domain or base.name, domain_uuid=uuid, points=tuple(points), folder=os.fspath(base))


def _checkpoint_list(base: Path, names: list[str]) -> tuple[str | None, list[str]]:
    cpt_files = [n for n in names if n.endswith(".cpt")]
    if not cpt_files:
        return None, []
    if len(cpt_files) > 1:
        raise errors.BackupSetError(path=str(base), reason=f"several checkpoint lists: {', '.join(cpt_files)}")
    path = base / cpt_files[0]
    try:
        cpts = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise errors.FormatError(path=str(path), offset=0, reason=f"unreadable checkpoint list: {err}") from err
    if not isinstance(cpts, list) or not all(isinstance(c, str) for c in cpts):
        raise errors.FormatError(path=str(path), offset=0, reason="checkpoint list is not a JSON list of names")
    return cpt_files[0][:-len(".cpt")], cpts


def _describe(base: Path, name: str) -> _File | None:
    m = _DATA_NAME.match(name)
    if m is None:
        return None
    path = base / name
    level = m.group("level") or ("inc" if m.group("cpt") else "diff")
    size = path.stat().st_size
    recorded = legacy_stream.adler32_of_chksum_file(str(path))
    digest = f"adler32:{recorded:08x}" if recorded is not None else ""
    try:
        with open_stream(path) as reader:
            meta = reader.meta
            raw = getattr(reader, "raw_meta", {})
    except errors.FormatError:
        if level != "copy":
            raise
        # a raw disk saved by virtnbdbackup as a plain full-provisioned image
        entry = DiskEntry(disk=m.group("disk"), file=name, disk_format="raw", virtual_size=size, level="copy",
                          stored_bytes=size, data_bytes=size, zero_bytes=0, digest=digest, file_digest="",
                          extra=MappingProxyType({"legacy": True, "raw_image": True}))
        return _File(name, m.group("disk"), "copy", "copy", "copy", None, None, "", entry)
    ident = {"copy": "copy", "diff": m.group("diff")}.get(level) or str(raw.get("checkpointName") or "")
    if level == "inc" and m.group("cpt") != ident:
        raise errors.ChainError(reason=f"{path}: file name names checkpoint {m.group('cpt')} but the stream "
                                       f"says {ident}")
    point = {"copy": "copy", "diff": f"diff.{m.group('diff')}"}.get(level, ident)
    extra: dict[str, Any] = {"legacy": True, "legacy_meta": raw}
    info = _image_info(base, m.group("disk"), ident)
    if info is not None:
        extra["image_info"] = info
    entry = DiskEntry(disk=m.group("disk"), file=name, disk_format=meta.disk_format, virtual_size=meta.virtual_size,
                      level=level, stored_bytes=size, data_bytes=int(raw.get("dataSize", 0)), zero_bytes=0,
                      digest=digest, file_digest="", extra=MappingProxyType(extra))
    return _File(name, m.group("disk"), level, point, ident, meta.parent, meta.checkpoint, meta.time, entry)


def _image_info(base: Path, disk: str, ident: str) -> Any:
    path = base / f"{disk}.{ident}.qcow.json"
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


def _group(base: Path, files: list[_File]) -> list[Point]:
    by_point: dict[str, list[_File]] = {}
    for f in files:
        by_point.setdefault(f.point, []).append(f)
    points = []
    for name, group in by_point.items():
        first = group[0]
        for other in group[1:]:
            if (other.level, other.parent) != (first.level, first.parent):
                raise errors.ChainError(reason=f"point {name}: disks disagree about level/parent "
                                               f"({first.name}, {other.name})")
        points.append(Point(
            name=name, level=first.level, parent=first.parent, checkpoint=first.checkpoint, time=first.time,
            disks=MappingProxyType({f.disk: f.entry for f in group}),
            domain_xml=_read_text(base / f"vmconfig.{first.ident}.xml"),
            checkpoint_xml=_read_text(base / "checkpoints" / f"{first.ident}.xml") if first.checkpoint else None,
            consistency="unknown", extra=MappingProxyType({"legacy": True})))
    return points


def _order(points: list[Point], cpts: list[str]) -> list[Point]:
    """Chain order: checkpoints in .cpt order, each diff right after the checkpoint it is relative to.

    A diff's parent is the newest checkpoint at the time it was taken, so it
    precedes the next checkpoint; diffs with the same parent sort by their
    identifier (an epoch). Points missing from the .cpt list follow, by
    checkpoint number.
    """
    heads = [p for p in points if p.level in ("full", "inc")]
    rank = {name: i for i, name in enumerate(cpts)}
    unknown = [p.name for p in heads if p.name not in rank]
    if unknown and cpts:
        log.warning("checkpoints not in the .cpt list, ordered by number: %s", ", ".join(unknown))

    def head_key(p: Point) -> tuple[int, int, str]:
        number = checkpoint_number(p.name)
        return (rank.get(p.name, len(rank)), number if number is not None else 1 << 30, p.name)

    diffs = sorted((p for p in points if p.level == "diff"), key=lambda p: _diff_key(p.name))
    ordered: list[Point] = [p for p in points if p.level == "copy"]
    for head in sorted(heads, key=head_key):
        ordered.append(head)
        ordered.extend(d for d in diffs if d.parent == head.name)
    known = {p.name for p in ordered}
    ordered.extend(d for d in diffs if d.name not in known)   # orphans: resolve() reports their missing parent
    return ordered


def _diff_key(name: str) -> tuple[int, str]:
    ident = name.split(".", 1)[1] if "." in name else name
    return (int(ident), name) if ident.isdigit() else (1 << 62, name)
