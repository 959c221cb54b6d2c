"""From a backup folder (or an explicit file list) to the stream files of each disk, root first.

The chain comes from the manifest's parent links (``backupset.chain.resolve``),
never from file times. Every file of the chain is opened and checked against
what the manifest recorded (disk, level, checkpoint, parent, size) before a
single byte is written, so a missing, truncated or foreign file in the middle
is an error naming the file and its point.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from virtnbd import errors
from virtnbd.backupset import chain as chain_mod
from virtnbd.backupset import qcow2set  # noqa: F401  (registers the qcow2 kind)
from virtnbd.backupset.api import BackupSet, open_set
from virtnbd.backupset.store import LocalStore
from virtnbd.stream.detect import open_stream
from virtnbd.stream.reader import StreamReader

log = logging.getLogger(__name__)


class ChainFileError(errors.ChainError):
    """One file of the chain is missing, damaged or does not belong there."""

    template = "{path} (point {point}): {reason}"


@dataclass(frozen=True)
class ChainFile:
    path: str
    point: str
    level: str
    entry: Any = None                      # backupset DiskEntry when known (None for --sequence)
    bset: Any = None                       # the BackupSet holding it (None for --sequence files)


@dataclass(frozen=True)
class DiskChain:
    disk: str
    files: tuple[ChainFile, ...]           # root first; the last is the point being restored
    image_info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Selection:
    """What a restore/verify/dump works on."""

    folder: str
    manifest: Any                          # backupset Manifest (None for --sequence)
    points: tuple[Any, ...]                # resolved chain of Points, root first (empty for --sequence)
    disks: tuple[DiskChain, ...]
    bset: BackupSet | None = None          # the set (None for --sequence)


def manifest_of(bset: BackupSet) -> Any:
    found = bset.manifest()
    if found is None:
        raise errors.BackupSetError(path=bset.location,
                                    reason="not a backup folder (no manifest, no virtnbdbackup files)")
    return found


def _side_file(folder: str | BackupSet, name: str) -> bytes | None:
    """A side file the backup saved next to the streams (plain names only)."""
    bset = open_set(folder) if isinstance(folder, str) else folder
    if os.path.isabs(name) or ".." in name.split("/"):
        log.warning("%s: ignoring side file name %r outside the set", bset.location, name)
        return None
    try:
        data = bset.read_side(name)
    except errors.BackupSetError as err:
        log.warning("%s: cannot read %s: %s", bset.location, name, err.fields.get("reason"))
        return None
    if data is None:
        log.warning("%s: cannot read %s: no such file", bset.location, name)
    return data


def side_file_bytes(folder: str | BackupSet, name: str) -> bytes | None:
    """A side file's plain bytes (the set unseals it when it is encrypted)."""
    return _side_file(folder, name)


def image_info_of(folder: str | BackupSet, point: Any, disk: str) -> Mapping[str, Any]:
    """The `qemu-img info` record saved at backup time for ``disk`` (empty when none)."""
    entry = point.disks.get(disk)
    candidates = [((getattr(entry, "extra", None) or {}).get(k)) for k in ("image_info", "qemu_img_info")]
    candidates.append(((getattr(point, "extra", None) or {}).get("qemu_img_info") or {}).get(disk))
    for info in candidates:
        if isinstance(info, Mapping):
            return info
        if isinstance(info, str):
            raw = _side_file(folder, info)
            if raw is not None:
                try:
                    loaded = json.loads(raw)
                except ValueError:
                    log.warning("%s: %s is not JSON: qcow2 created with default options", _where(folder), info)
                    continue
                if isinstance(loaded, Mapping):
                    return loaded
    return {}


def _where(folder: str | BackupSet) -> str:
    return folder if isinstance(folder, str) else folder.location


def domain_xml_of(folder: str | BackupSet, point: Any) -> str | None:
    """The domain XML saved with ``point``: inline text, or the name of a side file."""
    value = getattr(point, "domain_xml", None)
    if not value:
        return None
    if value.lstrip().startswith("<"):
        return str(value)
    raw = _side_file(folder, value)
    return raw.decode("utf-8", errors="replace") if raw is not None else None


def boot_file_of(folder: str | BackupSet, point: Any, kind: str) -> str | None:
    """Local path of a boot file (``nvram``, ``loader``...) the backup copied into the set."""
    bset = open_set(folder) if isinstance(folder, str) else folder
    name = ((getattr(point, "extra", None) or {}).get("boot_files") or {}).get(kind)
    if isinstance(name, str) and isinstance(bset.store, LocalStore) and bset.store.path(name).is_file():
        return bset.store.describe(name)
    return None


def select(folder: str, until: str | None, disk: str | None) -> Selection:
    bset = open_set(folder)
    manifest = manifest_of(bset)
    points = chain_mod.resolve(manifest, until)
    if not points:
        raise errors.ChainError(reason=f"{folder}: the backup set holds no point")
    last = points[-1]
    names = [disk] if disk else sorted(last.disks)
    if disk and disk not in last.disks:
        raise errors.UsageError(reason=f"disk {disk!r} not in point {last.name} (has: {', '.join(sorted(last.disks))})")
    disks = tuple(_disk_chain(bset, points, name) for name in names)
    return Selection(folder=folder, manifest=manifest, points=tuple(points), disks=disks, bset=bset)


def chain_file(bset: BackupSet, point: Any, entry: Any) -> ChainFile:
    """The ChainFile of one disk entry of a point of ``bset``."""
    return ChainFile(bset.store.describe(entry.file), point.name, entry.level or point.level, entry, bset)


def _disk_chain(bset: BackupSet, points: Sequence[Any], disk: str) -> DiskChain:
    files = tuple(chain_file(bset, point, entry) for point, entry in chain_mod.disk_layers(list(points), disk))
    return DiskChain(disk=disk, files=files, image_info=image_info_of(bset, points[-1], disk))


def select_sequence(paths: Sequence[str], disk: str | None) -> Selection:
    """An explicit list of files (root first): check that they form one chain of one disk."""
    files: list[ChainFile] = []
    names: set[str] = set()
    seen_checkpoints: list[str | None] = []
    for path in paths:
        found = _listed_image(path)
        with opened(found or ChainFile(path, "?", "?")) as reader:
            meta = reader.meta
        point = meta.checkpoint or os.path.basename(path)
        cf = found or ChainFile(path, point, meta.level)
        names.add(meta.disk)
        if len(names) > 1:
            raise ChainFileError(path=path, point=point, reason=f"is disk {meta.disk}, the sequence mixes disks")
        if not files:
            if meta.level not in ("copy", "full"):
                raise ChainFileError(path=path, point=point, reason=f"first file is a {meta.level}, not a full/copy")
        elif meta.level == "inc" and meta.parent != seen_checkpoints[-1]:
            raise ChainFileError(path=path, point=point,
                                 reason=f"parent is {meta.parent}, expected {seen_checkpoints[-1]} (chain broken)")
        elif meta.level == "diff" and meta.parent not in seen_checkpoints:
            raise ChainFileError(path=path, point=point, reason=f"parent {meta.parent} is not earlier in the sequence")
        elif meta.level in ("copy", "full"):
            raise ChainFileError(path=path, point=point, reason=f"a {meta.level} can only be the first file")
        if files and files[-1].level == "diff":
            raise ChainFileError(path=path, point=point, reason="nothing can follow a diff in a sequence")
        seen_checkpoints.append(meta.checkpoint)
        files.append(cf)
    if not files:
        raise errors.UsageError(reason="--sequence needs at least one file")
    name = names.pop()
    if disk and disk != name:
        raise errors.UsageError(reason=f"--disk {disk}: the sequence holds disk {name}")
    folder = os.path.dirname(os.path.abspath(paths[0]))
    return Selection(folder=folder, manifest=None, points=(), disks=(DiskChain(name, tuple(files)),))


def _listed_image(path: str) -> ChainFile | None:
    """A qcow2 point image given to --sequence: its point and manifest entry (integrity record) from
    the set in its folder; None for stream files."""
    if not path.endswith(".qcow2"):
        return None
    name = os.path.basename(path)
    bset = open_set(os.path.dirname(os.path.abspath(path)))
    for point in manifest_of(bset).points:
        for entry in point.disks.values():
            if entry.file == name:
                return chain_file(bset, point, entry)
    raise ChainFileError(path=path, point="?", reason="not listed by the manifest of its folder (qcow2 images "
                                                      "are read with the integrity records of their set)")


@contextlib.contextmanager
def opened(cf: ChainFile) -> Iterator[StreamReader]:
    """Open one chain file, every failure named by file and point."""
    if (_size_of(cf) if cf.bset is not None else (0 if os.path.exists(cf.path) else None)) is None:
        raise ChainFileError(path=cf.path, point=cf.point, reason="file is missing")
    try:
        reader = open_stream(cf.path) if cf.bset is None else cf.bset.open_data(cf.entry)
    except errors.FormatError as err:
        raise ChainFileError(path=cf.path, point=cf.point, reason=f"offset {err.offset}: {err.reason}") from err
    with reader:
        yield reader


def check_against_entry(cf: ChainFile, reader: StreamReader) -> None:
    """The file is the one the manifest recorded for this point (cheap checks, no full read)."""
    entry, meta = cf.entry, reader.meta
    if entry is None:
        return

    def fail(reason: str) -> None:
        raise ChainFileError(path=cf.path, point=cf.point, reason=reason)

    if meta.disk != entry.disk:
        fail(f"holds disk {meta.disk}, manifest says {entry.disk}")
    if meta.virtual_size != entry.virtual_size:
        fail(f"virtual size {meta.virtual_size}, manifest says {entry.virtual_size}")
    if entry.level and meta.level != entry.level:
        fail(f"is a {meta.level} stream, manifest says {entry.level}")
    stored = getattr(entry, "stored_bytes", None)
    if stored:
        size = _size_of(cf)
        if size != stored:
            fail(f"size {size} bytes, manifest recorded {stored} (truncated or replaced)")


def _size_of(cf: ChainFile) -> int | None:
    if cf.bset is None:
        return os.path.getsize(cf.path)
    return cast(int | None, cf.bset.store.size(cf.entry.file))


def describe(err: errors.FormatError, files: Sequence[ChainFile]) -> ChainFileError:
    """Name the point of a FormatError raised while reading one of ``files``."""
    point = next((cf.point for cf in files if cf.path == err.path), "?")
    return ChainFileError(path=err.path, point=point, reason=f"offset {err.offset}: {err.reason}")


def check_links(files: Sequence[ChainFile], metas: Sequence[Any]) -> None:
    """Each stream's parent is the checkpoint of the stream before it (diff: of an earlier one)."""
    earlier: list[str | None] = []
    for index, (cf, meta) in enumerate(zip(files, metas, strict=True)):
        if index and meta.level == "inc" and meta.parent != earlier[-1]:
            raise ChainFileError(path=cf.path, point=cf.point,
                                 reason=f"parent checkpoint {meta.parent}, but the point before it created "
                                        f"{earlier[-1]} (chain broken)")
        if index and meta.level == "diff" and meta.parent not in earlier:
            raise ChainFileError(path=cf.path, point=cf.point,
                                 reason=f"parent checkpoint {meta.parent} is not in the chain (chain broken)")
        earlier.append(meta.checkpoint)
