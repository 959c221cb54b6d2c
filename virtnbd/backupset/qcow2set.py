"""The qcow2 backup set: one qcow2 image per disk and point, chained by relative backing names.

Layout (docs/FORMAT.md, "qcow2 sets")::

    virtnbd.set.json                  {"kind": "qcow2", "version": 1}: marks the folder as a qcow2 set
    virtnbd.manifest.json             the same manifest as stream sets: it decides the chain
    sda.virtnbdbackup.0.qcow2         full: standalone thin qcow2
    sda.virtnbdbackup.1.qcow2         inc: overlay, backing "sda.virtnbdbackup.0.qcow2" (-F qcow2)
    sda.diff.1700000000.qcow2         diff: overlay on the newest full/inc image
    sda.copy.qcow2                    copy: standalone

A point's image is written under ``<name>.partial`` (:func:`prepare_image`), filled by our pull
engine or by a libvirt push job, then :func:`finish_image` flushes it, records its integrity
(xxh3-128 of every fixed region of the image FILE) and renames it; the point becomes real only
when :meth:`Qcow2Set.commit` appends it to the manifest. Push mode uses the same functions.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from virtnbd import errors
from virtnbd.backupset import naming
from virtnbd.backupset.api import BackupSet, StreamSet, register_kind
from virtnbd.backupset.manifest import DiskEntry, Manifest, Point
from virtnbd.backupset.qcow2integrity import Integrity, check_integrity, image_integrity
from virtnbd.backupset.store import LocalStore, Store
from virtnbd.fsutil import PARTIAL_SUFFIX, fsync_dir, storage_error

log = logging.getLogger(__name__)

KIND = "qcow2"
MARKER = "virtnbd.set.json"
IMAGE_SUFFIX = ".qcow2"

__all__ = ["KIND", "Integrity", "PreparedImage", "Qcow2Set", "backing_image", "check_integrity",
           "finish_image", "image_integrity", "image_name", "prepare_image"]


def image_name(disk: str, point: str) -> str:
    """``<disk>.<point>.qcow2``: sda.virtnbdbackup.0.qcow2, sda.diff.<epoch>.qcow2, sda.copy.qcow2.

    Used by push mode too.
    """
    naming.data_file(disk, "copy", point)          # same safety checks as stream names
    return f"{disk}.{point}{IMAGE_SUFFIX}"


def partial_name(name: str) -> str:
    """The name a point's image has until :func:`finish_image` (removed by recovery after a kill)."""
    return name + PARTIAL_SUFFIX


@dataclass(frozen=True)
class PreparedImage:
    """A point's image created under its partial name, ready to be written (pull or push)."""

    disk: str
    point: str
    level: str                 # copy | full | inc | diff (of the point)
    name: str                  # final object name: sda.virtnbdbackup.1.qcow2
    path: str                  # local path of the partial file being written
    virtual_size: int
    backing: str | None        # relative name of the backing image (overlays), None: standalone
    checkpoint: str | None     # checkpoint the point creates
    parent: str | None         # checkpoint the changes are relative to (inc/diff)
    disk_format: str = "qcow2"  # format of the source disk
    integrity: Integrity | None = None  # computed while writing (pull, standalone); None: hash the file


def backing_image(manifest: Manifest | None, parent_point: str | None, disk: str) -> str | None:
    """Name of the image an overlay of ``disk`` stacks on: the disk's image at ``parent_point``.

    None (a standalone image) when there is no parent or the disk is new since then.
    Used by push mode too.
    """
    if manifest is None or parent_point is None:
        return None
    point = manifest.point(parent_point)
    entry = point.disks.get(disk) if point is not None else None
    return entry.file if entry is not None else None


def prepare_image(bset: BackupSet, *, disk: str, point: str, level: str, virtual_size: int,
                  backing: str | None, checkpoint: str | None, parent: str | None,
                  disk_format: str = "qcow2", create_options: tuple[str, ...] = (),
                  create: bool = True) -> PreparedImage:
    """Create the point's target image under its partial name (0600): thin standalone qcow2 when
    ``backing`` is None (copy/full, or a disk new to the chain), else an overlay whose backing file
    is the RELATIVE name ``backing`` with ``-F qcow2``. Used by push mode too (libvirt reuses it).

    ``create=False``: names and checks only, the caller creates ``path`` itself (the pull engine
    writes standalone images directly, ``backup/qcow2write.py``)."""
    store = _local(bset)
    name = image_name(disk, point)
    path = str(store.path(partial_name(name)))
    found = bset.manifest()
    if any(e.file == name for p in (found.points if found else ()) for e in p.disks.values()):
        raise errors.BackupSetError(path=bset.location, reason=f"{name} belongs to a committed point already")
    for leftover in (path, str(store.path(name))):
        if os.path.lexists(leftover):            # under the lock and not in the manifest: a killed run's
            log.warning("removed %s left by a run that never committed", os.path.basename(leftover))
            os.unlink(leftover)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        if os.path.basename(backing) != backing or store.size(backing) is None:
            raise errors.BackupSetError(path=bset.location, reason=f"backing image {backing!r} is not in the set")
        argv += ["-b", backing, "-F", "qcow2"]
    if create_options:
        argv += ["-o", ",".join(create_options)]
    if create:
        _qemu_img([*argv, path, str(virtual_size)], path)
        os.chmod(path, 0o600)
    return PreparedImage(disk=disk, point=point, level=level, name=name, path=path, virtual_size=virtual_size,
                         backing=backing, checkpoint=checkpoint, parent=parent, disk_format=disk_format)


def finish_image(bset: BackupSet, image: PreparedImage, *, data_bytes: int, zero_bytes: int,
                 extra: Mapping[str, Any] | None = None) -> DiskEntry:
    """The written partial image becomes ``image.name``: fsync, integrity records (``image.integrity``
    when the writer computed them from the bytes it wrote, else the file is hashed), rename, fsync folder.

    Call after the writer (qemu-nbd or QEMU's push job) has closed the image. Returns the manifest
    entry to commit (``Qcow2Set.commit``); until then no point lists the file. Used by push mode too.
    """
    store = _local(bset)
    try:
        fd = os.open(image.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        integrity = image.integrity or image_integrity(image.path)
        os.replace(image.path, store.path(image.name))
        fsync_dir(store.root)
    except OSError as err:
        raise storage_error(image.path, err) from err
    info = {"checkpoint": image.checkpoint, "parent": image.parent, "backing": image.backing,
            "integrity": integrity.as_json(), **dict(extra or {})}
    return DiskEntry(disk=image.disk, file=image.name, disk_format=image.disk_format,
                     virtual_size=image.virtual_size, level=image.level, stored_bytes=integrity.size,
                     data_bytes=data_bytes, zero_bytes=zero_bytes, digest=integrity.digest, file_digest="",
                     extra=MappingProxyType(info))


def discard_image(bset: BackupSet, image: PreparedImage) -> None:
    """Remove a prepared (partial) or finished image that will not be committed (failed run).

    Never removes an image some committed point lists. Used by push mode too.
    """
    found = bset.manifest()
    listed = {e.file for p in (found.points if found else ()) for e in p.disks.values()}
    for path in (image.path, str(_local(bset).path(image.name))):
        if os.path.basename(path) in listed:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            log.info("removed %s of the run that did not commit", os.path.basename(path))


def _qemu_img(argv: list[str], path: str) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise errors.StorageError(path=path, reason="qemu-img not found (install qemu-utils)") from err
    except subprocess.CalledProcessError as err:
        lines = (err.stderr or err.stdout or "").strip().splitlines()
        raise errors.StorageError(path=path, reason=f"qemu-img failed: {lines[-1] if lines else err}") from err


def _local(bset: BackupSet) -> LocalStore:
    if not isinstance(bset.store, LocalStore):
        raise errors.UsageError(reason=f"{bset.location}: qcow2 sets are written into a local folder")
    return bset.store


class Qcow2Set(StreamSet):
    """Points as qcow2 images (see the module doc); manifest and commit as stream sets."""

    kind = KIND

    def open_data(self, entry: DiskEntry) -> Any:
        """A reader with the StreamReader interface over the image's own clusters (qcow2read)."""
        from virtnbd.backupset.qcow2read import open_point_image
        return open_point_image(self.store.describe(entry.file), entry)

    def data_name(self, disk: str, level: str, point: str) -> str:
        return image_name(disk, point)

    def create_data(self, name: str, staging_blocks: int = 0) -> Any:
        raise errors.BackupSetError(path=self.location,
                                    reason="a qcow2 set's images are written through prepare_image/finish_image")

    def commit(self, point: Point, domain: str, domain_uuid: str) -> Manifest:
        """The point becomes real: appended to the manifest atomically (every image checked present
        with its recorded size). Used by push mode too."""
        return super().commit(point, domain, domain_uuid)


def _probe(store: Store) -> BackupSet | None:
    data = store.read_bytes(MARKER)
    if data is None:
        return None
    try:
        kind = json.loads(data.decode()).get("kind")
    except (ValueError, AttributeError) as err:
        raise errors.FormatError(path=store.describe(MARKER), offset=0, reason=f"not a set marker: {err}") from err
    return Qcow2Set(store) if kind == KIND else None


def _create(store: Store) -> BackupSet:
    if store.read_bytes(MARKER) is None:
        store.replace(MARKER, (json.dumps({"kind": KIND, "version": 1}) + "\n").encode())
    return Qcow2Set(store)


register_kind(KIND, _probe, _create, first=True)
