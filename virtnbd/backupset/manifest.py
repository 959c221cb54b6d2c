"""The chain manifest: one JSON file per backup folder, the truth about the chain.

Every point (copy, full, inc, diff) is listed with its parent, its files,
sizes and checksums. The file is replaced atomically on each commit (temp
file, fsync, rename, fsync of the folder), so a reader sees the old or the new
manifest, never a mix. Schema: docs/FORMAT.md.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from virtnbd import errors, fsutil
from virtnbd.backupset import naming
from virtnbd.stream.format import StreamMeta, StreamTotals

if TYPE_CHECKING:
    from virtnbd.backupset.store import Store

FORMAT_NAME = "virtnbd-backupset"
FORMAT_VERSION = 1


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class DiskEntry:
    disk: str
    file: str                 # file name relative to the backup folder
    disk_format: str
    virtual_size: int
    level: str
    stored_bytes: int         # size of the stream file
    data_bytes: int
    zero_bytes: int
    digest: str               # the stream's chained digest (hex)
    file_digest: str          # xxh3-128 of the whole stream file (hex)
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Point:
    name: str                 # "virtnbdbackup.N" | "diff.<epoch>" | "copy"
    level: str                # "copy" | "full" | "inc" | "diff"
    parent: str | None        # name of the parent point (inc/diff)
    checkpoint: str | None    # checkpoint this point created (full/inc)
    time: str                 # ISO 8601 with zone
    disks: Mapping[str, DiskEntry]
    domain_xml: str | None = None
    checkpoint_xml: str | None = None
    consistency: str = "unknown"   # e.g. "frozen" | "crash" | "offline"
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Manifest:
    domain: str
    domain_uuid: str
    points: tuple[Point, ...]
    folder: str | None = None     # where it was loaded from (addition to the contract)

    def point(self, name: str) -> Point | None:
        return next((p for p in self.points if p.name == name), None)


def disk_entry(meta: StreamMeta, file: str, totals: StreamTotals,
               extra: Mapping[str, Any] | None = None) -> DiskEntry:
    """The manifest entry for a stream just written (convenience for the backup side)."""
    return DiskEntry(disk=meta.disk, file=file, disk_format=meta.disk_format, virtual_size=meta.virtual_size,
                     level=meta.level, stored_bytes=totals.stored_bytes, data_bytes=totals.data_bytes,
                     zero_bytes=totals.zero_bytes, digest=totals.digest, file_digest=totals.file_digest,
                     extra=_frozen(extra))


def manifest_path(folder: str | os.PathLike[str]) -> Path:
    return Path(folder) / naming.MANIFEST


# -- JSON <-> records ------------------------------------------------------------

def _disk_to_json(d: DiskEntry) -> dict[str, Any]:
    return {"disk": d.disk, "file": d.file, "disk_format": d.disk_format, "virtual_size": d.virtual_size,
            "level": d.level, "stored_bytes": d.stored_bytes, "data_bytes": d.data_bytes,
            "zero_bytes": d.zero_bytes, "digest": d.digest, "file_digest": d.file_digest, "extra": dict(d.extra)}


def _point_to_json(p: Point) -> dict[str, Any]:
    return {"name": p.name, "level": p.level, "parent": p.parent, "checkpoint": p.checkpoint, "time": p.time,
            "consistency": p.consistency, "disks": {k: _disk_to_json(v) for k, v in p.disks.items()},
            "domain_xml": p.domain_xml, "checkpoint_xml": p.checkpoint_xml, "extra": dict(p.extra)}


def to_json(m: Manifest, mac_key: bytes | None = None) -> bytes:
    """The manifest file; with ``mac_key`` (encrypted sets) an ``auth`` record: HMAC-SHA256 of the
    file as written without it (a reader re-serialises and compares bytes: see :func:`authenticate`)."""
    doc: dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "domain": m.domain,
                           "domain_uuid": m.domain_uuid, "points": [_point_to_json(p) for p in m.points]}
    if mac_key is not None:
        body = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
        doc["auth"] = {"hmac-sha256": hmac.new(mac_key, body, hashlib.sha256).hexdigest()}
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


class _Schema:
    """Typed access to a decoded JSON object; errors name the file and the key path."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, where: str, reason: str) -> errors.FormatError:
        return errors.FormatError(path=self.path, offset=0, reason=f"{where}: {reason}")

    def get(self, obj: Any, key: str, types: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(obj, dict):
            raise self.fail(where, "not an object")
        if key not in obj:
            raise self.fail(where, f"missing key {key!r}")
        value = obj[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
            raise self.fail(f"{where}.{key}", f"wrong type {type(value).__name__}")
        return value


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


_OPT_STR = (str, type(None))


def _disk_from_json(s: _Schema, obj: Any, where: str) -> DiskEntry:
    ints = {k: s.get(obj, k, int, where) for k in ("virtual_size", "stored_bytes", "data_bytes", "zero_bytes")}
    if any(v < 0 for v in ints.values()):
        raise s.fail(where, "negative size")
    file = s.get(obj, "file", str, where)
    if "/" in file or file in ("", ".", ".."):
        raise s.fail(f"{where}.file", f"{file!r} is not a plain file name")
    return DiskEntry(disk=s.get(obj, "disk", str, where), file=file,
                     disk_format=s.get(obj, "disk_format", str, where), level=s.get(obj, "level", str, where),
                     digest=s.get(obj, "digest", str, where), file_digest=s.get(obj, "file_digest", str, where),
                     extra=_frozen(s.get(obj, "extra", dict, where)), **ints)


def _point_from_json(s: _Schema, obj: Any, where: str) -> Point:
    level = s.get(obj, "level", str, where)
    if level not in naming.LEVELS:
        raise s.fail(f"{where}.level", f"unknown level {level!r}")
    disks = s.get(obj, "disks", dict, where)
    return Point(name=s.get(obj, "name", str, where), level=level, parent=s.get(obj, "parent", _OPT_STR, where),
                 checkpoint=s.get(obj, "checkpoint", _OPT_STR, where), time=s.get(obj, "time", str, where),
                 disks=MappingProxyType({k: _disk_from_json(s, v, f"{where}.disks.{k}") for k, v in disks.items()}),
                 domain_xml=s.get(obj, "domain_xml", _OPT_STR, where),
                 checkpoint_xml=s.get(obj, "checkpoint_xml", _OPT_STR, where),
                 consistency=s.get(obj, "consistency", str, where),
                 extra=_frozen(s.get(obj, "extra", dict, where)))


def from_json(data: bytes, path: str, folder: str | None = None) -> Manifest:
    try:
        doc = json.loads(data.decode())
    except UnicodeDecodeError as err:
        raise errors.FormatError(path=path, offset=err.start, reason="manifest is not UTF-8") from err
    except json.JSONDecodeError as err:
        raise errors.FormatError(path=path, offset=err.pos, reason=f"manifest is not JSON: {err.msg}") from err
    s = _Schema(path)
    if s.get(doc, "format", str, "manifest") != FORMAT_NAME:
        raise s.fail("manifest", f"not a {FORMAT_NAME} manifest")
    version = s.get(doc, "version", int, "manifest")
    if version != FORMAT_VERSION:
        raise s.fail("manifest", f"unsupported manifest version {version} (this tool reads {FORMAT_VERSION})")
    points = tuple(_point_from_json(s, p, f"points[{i}]")
                   for i, p in enumerate(s.get(doc, "points", list, "manifest")))
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise s.fail("manifest", "duplicate point names")
    return Manifest(domain=s.get(doc, "domain", str, "manifest"),
                    domain_uuid=s.get(doc, "domain_uuid", str, "manifest"), points=points, folder=folder)


# -- load / commit ------------------------------------------------------------------

def load(folder: str | os.PathLike[str]) -> Manifest | None:
    """The folder's manifest, or None when it has none."""
    path = manifest_path(folder)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise errors.BackupSetError(path=str(path), reason=err.strerror or str(err)) from err
    return from_json(data, str(path), os.fspath(folder))


def _check_new_point(m: Manifest, point: Point) -> None:
    if m.point(point.name) is not None:
        raise errors.ChainError(reason=f"point {point.name} already exists in the backup set")
    if point.level not in naming.LEVELS:
        raise errors.ChainError(reason=f"point {point.name}: unknown level {point.level!r}")
    if point.level in ("copy", "full"):
        if point.parent is not None:
            raise errors.ChainError(reason=f"point {point.name}: a {point.level} backup has no parent")
        if m.points:
            raise errors.ChainError(reason=f"point {point.name}: a {point.level} backup needs an empty folder "
                                           f"(this one already holds {len(m.points)} point(s))")
        return
    heads = [p for p in m.points if p.level in ("full", "inc")]
    if not heads:
        raise errors.ChainError(reason=f"point {point.name}: an {point.level} backup needs a full backup first")
    if point.parent != heads[-1].name:
        raise errors.ChainError(reason=f"point {point.name}: parent must be the newest full/inc point "
                                       f"{heads[-1].name}, not {point.parent}")


def _check_files(folder: Path, point: Point) -> None:
    for disk in point.disks.values():
        path = folder / disk.file
        if "/" in disk.file:
            raise errors.BackupSetError(path=str(path), reason="manifest file names must be plain names")
        try:
            size = path.stat().st_size
        except OSError as err:
            raise errors.BackupSetError(path=str(path), reason=f"point {point.name}: {err.strerror}") from err
        if size != disk.stored_bytes:
            raise errors.BackupSetError(path=str(path), reason=f"point {point.name}: file has {size} bytes, "
                                                               f"entry says {disk.stored_bytes}")


def append_point(current: Manifest | None, point: Point, domain: str, domain_uuid: str, *, where: str,
                 size_of: Callable[[str], int | None]) -> Manifest:
    """``current`` with ``point`` appended, after the checks of :func:`commit_point`, for any store.

    ``size_of(name)`` is the store's size of an object (None when absent); ``where`` names the set.
    """
    current = current or Manifest(domain=domain, domain_uuid=domain_uuid, points=())
    if current.domain_uuid != domain_uuid:
        raise errors.BackupSetError(path=where, reason=f"set holds backups of domain {current.domain} "
                                                       f"({current.domain_uuid}), not {domain} ({domain_uuid})")
    _check_new_point(current, point)
    for disk in point.disks.values():
        size = size_of(disk.file)
        if "/" in disk.file or size != disk.stored_bytes:
            reason = f"point {point.name}: object has {size} bytes, entry says {disk.stored_bytes}"
            raise errors.BackupSetError(path=f"{where}/{disk.file}", reason=reason)
    return replace(current, domain=domain, points=(*current.points, point))


def commit_point(folder: str | os.PathLike[str], point: Point, domain: str, domain_uuid: str,
                 mac_key: bytes | None = None) -> Manifest:
    """Append ``point`` to the folder's manifest (created if absent), atomically.

    Checks before writing: the folder belongs to the same domain (uuid), the
    point name is new, the parent link is valid (inc/diff: parent = newest
    full/inc; copy/full: first point, no parent) and every file the point
    lists exists with the size recorded.
    """
    base = Path(folder)
    if not base.is_dir():
        raise errors.BackupSetError(path=str(base), reason="backup folder does not exist")
    current = load(base) or Manifest(domain=domain, domain_uuid=domain_uuid, points=(), folder=os.fspath(base))
    if current.domain_uuid != domain_uuid:
        raise errors.BackupSetError(path=str(base), reason=f"folder holds backups of domain {current.domain} "
                                                           f"({current.domain_uuid}), not {domain} ({domain_uuid})")
    _check_new_point(current, point)
    _check_files(base, point)
    updated = replace(current, domain=domain, points=(*current.points, point), folder=os.fspath(base))
    fsutil.save_atomic(manifest_path(base), to_json(updated, mac_key))
    return updated


def _check_chain(points: tuple[Point, ...]) -> None:
    """Every point valid in order, as if committed one by one (first copy/full, inc parent = newest full/inc)."""
    built = Manifest(domain="", domain_uuid="", points=())
    for point in points:
        _check_new_point(built, point)
        built = replace(built, points=(*built.points, point))


def rewrite(store: Store, previous: Manifest, points: tuple[Point, ...], mac_key: bytes | None = None) -> Manifest:
    """Replace the chain's points atomically (prune, consolidation), under the caller's lock.

    The manifest in the store must still be ``previous``; the new list must form a
    valid chain and every file it lists must exist with its recorded size. The
    store replaces the manifest whole (a folder: fsync + rename; S3: one PUT).
    ``mac_key``: an encrypted set's manifest key (the new manifest carries its MAC).
    """
    data = store.read_bytes(naming.MANIFEST)
    where = store.describe(naming.MANIFEST)
    current = None if data is None else from_json(data, where)
    if current is None or to_json(current) != to_json(previous):
        raise errors.BackupSetError(path=where, reason="the manifest changed while the chain was rewritten")
    _check_chain(points)
    for point in points:
        _check_sizes(store, point)
    updated = replace(previous, points=points)
    store.replace(naming.MANIFEST, to_json(updated, mac_key))
    return updated


def _check_sizes(store: Store, point: Point) -> None:
    for disk in point.disks.values():
        size = store.size(disk.file)
        if "/" in disk.file or size != disk.stored_bytes:
            raise errors.BackupSetError(path=store.describe(disk.file),
                                        reason=f"point {point.name}: object has {size} bytes, "
                                               f"entry says {disk.stored_bytes}")
