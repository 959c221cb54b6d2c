"""Pull engine into a qcow2 point image: the same copy loop, frames written through qemu-nbd.

``copy.copy_disk`` hands frames in disk order to :class:`ImageSink` instead of a StreamWriter:
data frames are written (libnbd pwrite into a private ``qemu-nbd`` serving the prepared
partial image, :class:`virtnbd.restore.targets.qcow2.ServedImage`); zero frames are written
as NBD write-zeroes into overlays (qemu records zero clusters, the backing is never exposed)
and skipped in standalone images (unallocated clusters read as zeroes: holes stay holes).
"""
from __future__ import annotations

import threading
from concurrent.futures import Executor
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from virtnbd.backup import copy
from virtnbd.backupset.qcow2set import PreparedImage
from virtnbd.restore.targets.qcow2 import ServedImage
from virtnbd.source.nbdsource import NbdSource
from virtnbd.stream.codec import Codec
from virtnbd.stream.format import EncodedFrame, StreamMeta

PLAIN = Codec(())          # no checksum, no compression: payload = the disk bytes


class ImageSink:
    """The writer side of the copy loop for one prepared image (``codec``, ``meta``, ``add``)."""

    codec = PLAIN

    def __init__(self, image: PreparedImage, served: ServedImage) -> None:
        self.image = image
        self.served = served
        self.overlay = image.backing is not None
        self.meta = StreamMeta(virtual_size=image.virtual_size, disk=image.disk, disk_format=image.disk_format,
                               level=image.level, checkpoint=image.checkpoint, parent=image.parent, time="",
                               compression=None, tool_version="", extra=MappingProxyType({}))
        self.zeroed = 0

    def add(self, frame: EncodedFrame) -> None:
        if frame.kind == "data":
            self.served.write(frame.offset, frame.payload)
        elif self.overlay:
            self.served.zero(frame.offset, frame.length)
            self.zeroed += frame.length


@dataclass(frozen=True)
class ImageCopy:
    stats: copy.CopyStats
    zeroed: int               # bytes written as zero clusters (overlays)


def copy_into_image(src: NbdSource, image: PreparedImage, extents: Any, pool: Executor, *, read_size: int,
                    progress: Any = None, cancel: threading.Event | None = None) -> ImageCopy:
    """Copy ``extents`` of ``src`` into the prepared partial image; the image is closed cleanly on return."""
    served = ServedImage(image.path, workers=1, label=image.path, persistent=False)
    served.start()
    try:
        sink = ImageSink(image, served)
        stats = copy.copy_disk(src, sink, extents, pool, read_size=read_size, progress=progress, cancel=cancel)
        served.finish()
    except BaseException:
        served.stop()
        raise
    return ImageCopy(stats, sink.zeroed)

