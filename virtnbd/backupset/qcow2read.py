"""Read one qcow2 point image with the StreamReader interface (restore, verify, dump, map).

Frames are the image's OWN clusters (``qemu-img map``, depth 0): allocated data -> ``data``
frames (split at FRAME bytes), zero clusters and, for an image without backing, unallocated
ranges -> ``zero`` frames; ranges an overlay inherits from its backing are not listed (an older
layer of the chain has them). ``pos`` of a frame is its disk offset. Data is read through a
private read-only ``qemu-nbd`` (libnbd, systemd socket activation: it ends with the handle).

Before the first frame is listed, the image FILE is hashed region by region against the
manifest's integrity record (``qcow2integrity``): a restore never reads a changed image.
``verify()`` is that check.
"""
from __future__ import annotations

import json
import subprocess
import threading
from types import MappingProxyType, TracebackType
from typing import Any

from virtnbd import errors
from virtnbd.backupset.manifest import DiskEntry
from virtnbd.backupset.qcow2integrity import check_integrity, from_json
from virtnbd.stream.format import FrameRef, StreamMeta, StreamTotals
from virtnbd.stream.reader import overlapping

FRAME = 4 << 20


def _map(path: str) -> list[dict[str, Any]]:
    argv = ["qemu-img", "map", "--output=json", "-f", "qcow2", path]
    try:
        done = subprocess.run(argv, check=True, capture_output=True, text=True)
        found = json.loads(done.stdout)
    except subprocess.CalledProcessError as err:
        lines = (err.stderr or "").strip().splitlines()
        raise errors.FormatError(path=path, offset=0, reason=f"qemu-img map: {lines[-1] if lines else err}") from err
    except ValueError as err:
        raise errors.FormatError(path=path, offset=0, reason=f"qemu-img map: {err}") from err
    return list(found)


def own_frames(extents: list[dict[str, Any]]) -> list[FrameRef]:
    """The frames of an image's own clusters, from ``qemu-img map --output=json`` entries."""
    frames: list[FrameRef] = []
    for ext in extents:
        start, length = int(ext["start"]), int(ext["length"])
        if ext.get("depth", 0) == 0 and ext.get("data"):
            frames += [FrameRef("data", off, min(FRAME, start + length - off), off)
                       for off in range(start, start + length, FRAME)]
        elif ext.get("depth", 0) == 0 or not ext.get("present", True):
            frames.append(FrameRef("zero", start, length, start))
    return frames


class Qcow2PointReader:
    """One disk at one point of a qcow2 set (see the module doc)."""

    def __init__(self, path: str, entry: DiskEntry) -> None:
        extra = entry.extra or {}
        self.path = path
        self.entry = entry
        self.meta = StreamMeta(virtual_size=entry.virtual_size, disk=entry.disk, disk_format=entry.disk_format,
                               level=entry.level, checkpoint=extra.get("checkpoint"), parent=extra.get("parent"),
                               time="", compression=None, tool_version="", extra=MappingProxyType({}))
        self.totals: StreamTotals | None = None
        self._frames: list[FrameRef] | None = None
        self._starts: list[int] = []
        self._lock = threading.Lock()
        self._nbd: Any = None

    def __enter__(self) -> Qcow2PointReader:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        h, self._nbd = self._nbd, None
        if h is not None:
            import nbd
            try:
                h.shutdown()
            except nbd.Error:
                pass

    def verify(self) -> StreamTotals:
        """Hash the file against the manifest's record (FormatError naming the region that differs)."""
        record = from_json((self.entry.extra or {}).get("integrity"), self.path)
        check_integrity(self.path, record)
        e = self.entry
        self.totals = StreamTotals(frames=len(record.regions), data_bytes=e.data_bytes, zero_bytes=e.zero_bytes,
                                   stored_bytes=record.size, digest=record.digest, file_digest="")
        return self.totals

    def frames(self) -> list[FrameRef]:
        with self._lock:
            if self._frames is None:
                if self.totals is None:
                    self.verify()
                self._frames = own_frames(_map(self.path))
                self._starts = [f.offset for f in self._frames]
            return self._frames

    def frames_in(self, offset: int, length: int) -> list[FrameRef]:
        return overlapping(self.frames(), self._starts, offset, length)

    def _handle(self) -> Any:
        with self._lock:
            if self._nbd is None:
                import nbd  # Debian python3-libnbd
                h = nbd.NBD()
                try:
                    h.connect_systemd_socket_activation(["qemu-nbd", "-r", "-f", "qcow2", "--cache=writeback",
                                                         "-e", "8", self.path])
                except nbd.Error as err:
                    raise errors.FormatError(path=self.path, offset=0, reason=f"qemu-nbd: {err}") from err
                self._nbd = h
            return self._nbd

    def read(self, ref: FrameRef) -> bytes:
        if ref.kind != "data":
            return bytes(ref.length)
        return self.read_range(ref.offset, ref.length)

    def read_range(self, offset: int, length: int) -> bytes:
        import nbd
        try:
            return bytes(self._handle().pread(length, offset))
        except nbd.Error as err:
            raise errors.FormatError(path=self.path, offset=offset, reason=f"read through qemu-nbd: {err}") from err


def open_point_image(path: str, entry: DiskEntry) -> Qcow2PointReader:
    return Qcow2PointReader(path, entry)
