"""Pull engine into a qcow2 point image: the same copy loop, frames written into the image.

``copy.copy_disk`` hands frames in disk order to :class:`ImageSink` instead of a StreamWriter.

- Standalone images (copy/full, and disks an inc/diff copies whole): the restore side's direct
  qcow2 writer (:class:`virtnbd.restore.targets.qcow2direct.Qcow2DirectTarget`: data clusters
  with ``os.pwrite`` in disk order, metadata laid out at the end). Zero frames are skipped:
  unallocated clusters read as zeroes, holes stay holes. The integrity records are computed from
  the bytes as they are written (:class:`HashedQcow2Target`), not by reading the image again.
- Overlays (inc/diff of a disk read by its bitmap): the prepared image served by a private
  ``qemu-nbd`` (:class:`virtnbd.restore.targets.qcow2.ServedImage`); zero frames become NBD
  write-zeroes, which qemu records as zero clusters: the backing is never exposed.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from types import MappingProxyType
from typing import Any

from virtnbd import errors
from virtnbd.backup import copy
from virtnbd.backupset.qcow2integrity import RegionHasher, region_for
from virtnbd.backupset.qcow2set import PreparedImage
from virtnbd.restore.targets import qcow2direct
from virtnbd.restore.targets.base import TargetRequest
from virtnbd.restore.targets.qcow2 import ServedImage
from virtnbd.restore.targets.qcow2direct import Qcow2DirectTarget
from virtnbd.source.nbdsource import NbdSource
from virtnbd.stream.codec import Codec
from virtnbd.stream.format import EncodedFrame, StreamMeta

PLAIN = Codec(())          # no checksum, no compression: payload = the disk bytes


class ImageSink:
    """The writer side of the copy loop for one image (``codec``, ``meta``, ``add``)."""

    codec = PLAIN

    def __init__(self, image: PreparedImage, write: Callable[[int, Any], None],
                 zero: Callable[[int, int], None] | None) -> None:
        self.image = image
        self._write = write
        self._zero = zero
        self.meta = StreamMeta(virtual_size=image.virtual_size, disk=image.disk, disk_format=image.disk_format,
                               level=image.level, checkpoint=image.checkpoint, parent=image.parent, time="",
                               compression=None, tool_version="", extra=MappingProxyType({}))

    def add(self, frame: EncodedFrame) -> None:
        if frame.kind == "data":
            self._write(frame.offset, frame.payload)
        elif self._zero is not None:
            self._zero(frame.offset, frame.length)


class HashedQcow2Target(Qcow2DirectTarget):
    """The direct qcow2 writer, hashing every byte it writes into the integrity record."""

    def __init__(self, request: TargetRequest, image: Any) -> None:
        super().__init__(request, image)
        # the final file size is not known yet: regions sized for the largest image the disk can give
        self.hasher = RegionHasher(region_for(request.virtual_size))

    def _put(self, fd: int, data: bytes | memoryview, pos: int) -> None:
        super()._put(fd, data, pos)
        self.hasher.written(pos, data)


def copy_into_image(src: NbdSource, image: PreparedImage, extents: Any, pool: Executor, *, read_size: int,
                    progress: Any = None, cancel: threading.Event | None = None
                    ) -> tuple[PreparedImage, copy.CopyStats]:
    """Copy ``extents`` of ``src`` into the prepared partial image; on return it is complete and closed
    (still under its partial name: ``qcow2set.finish_image`` records and renames it). The image
    returned carries its integrity record when it was computed while writing."""
    if image.backing is None:
        return _into_standalone(src, image, extents, pool, read_size=read_size, progress=progress, cancel=cancel)
    served = ServedImage(image.path, workers=1, label=image.path, persistent=False)
    served.start()
    try:
        sink = ImageSink(image, served.write, served.zero)
        stats = copy.copy_disk(src, sink, extents, pool, read_size=read_size, progress=progress, cancel=cancel)
        served.finish()
    except BaseException:
        served.stop()
        raise
    return image, stats


def _into_standalone(src: NbdSource, image: PreparedImage, extents: Any, pool: Executor, *, read_size: int,
                     progress: Any, cancel: threading.Event | None) -> tuple[PreparedImage, copy.CopyStats]:
    final = os.path.join(os.path.dirname(image.path), image.name)
    target = HashedQcow2Target(TargetRequest(spec=final, format="qcow2", virtual_size=image.virtual_size),
                               qcow2direct.settings({}, False) or {})
    if target.tmp != image.path:
        target.abort()
        raise errors.UsageError(reason=f"{image.path}: unexpected partial name {target.tmp}")
    try:
        sink = ImageSink(image, target.write, None)
        stats = copy.copy_disk(src, sink, extents, pool, read_size=read_size, progress=progress, cancel=cancel)
        target.complete()
        integrity = target.hasher.finish(image.path)
    except BaseException:
        target.abort()
        raise
    return dataclasses.replace(image, integrity=integrity), stats
