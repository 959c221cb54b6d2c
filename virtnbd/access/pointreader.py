"""A disk at one backup point, read at random: ``pread`` and ``extents`` without a restore.

Built on the backup-set interface (``virtnbd.backupset.api``): the chain comes
from ``BackupSet.chain`` and each point's data from ``BackupSet.open_data``
(through ``restore.source``), so every kind of set the interface knows works.

Every read asks the chain newest first: the newest point whose index lists a
frame at that offset holds the bytes; a range no point lists is a hole (reads
as zeros). No chain replay and no temporary copy: each point's index is kept
compactly (:mod:`virtnbd.access.frametable`) and frames are read with
``pread`` from the set's own files. Every frame a read touches is checksum
verified by its stream reader before a byte of it is returned; a damaged
frame fails that read with a :class:`virtnbd.restore.source.ChainFileError`
naming file, point and offset. Recently decoded frames stay in a small LRU
cache. Thread-safe: nbdkit and the FUSE layer call it from several threads.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from virtnbd import errors
from virtnbd.access import frametable
from virtnbd.access.frametable import FrameTable
from virtnbd.restore import source
from virtnbd.restore.source import ChainFile, DiskChain
from virtnbd.stream.reader import StreamReader

log = logging.getLogger(__name__)

CACHE_BYTES = 32 << 20
DATA, ZERO, HOLE = "data", "zero", "hole"


@dataclass(frozen=True)
class Layer:
    """One point of the disk's chain: its file, its reader and its frame table."""

    file: ChainFile
    reader: StreamReader
    table: FrameTable
    limit: int               # smallest virtual size of this and every newer point: beyond it the layer is unseen


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    kind: str                # DATA | ZERO | HOLE
    layer: int = -1          # index into PointReader.layers (DATA and ZERO)
    frame: int = -1          # index into that layer's table


class FrameCache:
    """Decoded frames, least recently used dropped first, bounded in bytes."""

    def __init__(self, budget: int = CACHE_BYTES) -> None:
        self.budget = budget
        self.used = 0
        self._items: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._loading: dict[tuple[int, int], threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def load(self, key: tuple[int, int], loader: Callable[[], bytes]) -> bytes:
        """The cached frame, else ``loader()`` once: concurrent readers of one frame wait for the first."""
        data = self.get(key)
        if data is not None:
            return data
        with self._lock:
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            data = self.get(key)
            if data is None:
                try:
                    data = loader()
                finally:
                    with self._lock:
                        self._loading.pop(key, None)
                self.put(key, data)
        return data

    def put(self, key: tuple[int, int], data: bytes) -> None:
        if len(data) > self.budget:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = data
            self.used += len(data)
            while self.used > self.budget:
                _, old = self._items.popitem(last=False)
                self.used -= len(old)


class PointReader:
    """Random reads of one disk at one point; build it with :func:`open_point`."""

    def __init__(self, disk: str, point: str, layers: Sequence[Layer], stack: contextlib.ExitStack,
                 cache_bytes: int = CACHE_BYTES) -> None:
        self.disk = disk
        self.point = point
        self.layers = tuple(layers)
        self.size = layers[-1].reader.meta.virtual_size
        self.cache = FrameCache(cache_bytes)
        self._stack = stack
        self._files = [layer.file for layer in layers]

    def __enter__(self) -> PointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()

    # -- where the bytes are ---------------------------------------------------------

    def segments(self, offset: int, length: int) -> list[Segment]:
        """``offset .. offset+length`` cut into pieces, each from one frame of one point or a hole."""
        self._check_range(offset, length)
        out: list[Segment] = []
        self._resolve(len(self.layers) - 1, offset, offset + length, out)
        return out

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise errors.UsageError(reason=f"disk {self.disk} at {self.point}: range {offset}+{length} "
                                           f"outside the disk (0..{self.size})")

    def _resolve(self, li: int, start: int, end: int, out: list[Segment]) -> None:
        if li < 0:
            out.append(Segment(start, end, HOLE))
            return
        layer = self.layers[li]
        table, stop, pos = layer.table, min(end, layer.limit), start
        i = table.at_or_after(pos)
        while pos < stop:
            if i < len(table) and table.starts[i] <= pos:
                seg_end = min(table.end(i), stop)
                out.append(Segment(pos, seg_end, DATA if table.kind(i) == DATA else ZERO, li, i))
                i += 1
            else:
                seg_end = min(table.starts[i], stop) if i < len(table) else stop
                self._resolve(li - 1, pos, seg_end, out)
            pos = seg_end
        if stop < end:
            out.append(Segment(max(stop, start), end, HOLE))

    def extents(self, offset: int, length: int) -> list[tuple[int, int, str]]:
        """``(start, length, kind)`` covering the range, neighbours of one kind merged."""
        merged: list[tuple[int, int, str]] = []
        for seg in self.segments(offset, length):
            if merged and merged[-1][2] == seg.kind:
                start, _, kind = merged[-1]
                merged[-1] = (start, seg.end - start, kind)
            else:
                merged.append((seg.start, seg.end - seg.start, seg.kind))
        return merged

    # -- the bytes --------------------------------------------------------------------

    def pread(self, offset: int, length: int) -> bytes | bytearray | memoryview:
        """The disk's bytes at the point; every frame touched is verified first.

        A read inside one data frame returns a view of the cached frame (no copy)."""
        segments = self.segments(offset, length)
        if len(segments) == 1 and segments[0].kind == DATA and not self._whole(segments[0]):
            seg = segments[0]
            skip = seg.start - self.layers[seg.layer].table.starts[seg.frame]
            return memoryview(self.frame_data(seg.layer, seg.frame))[skip:skip + length]
        out = bytearray(length)
        self._fill(offset, memoryview(out), segments, zeroed=True)
        return out

    def readinto(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` with the disk's bytes at ``offset``; every frame touched is verified first.

        A data frame the read covers whole goes straight from the file into ``view`` (one
        ``preadv``, no copy, not cached: nbdkit asks for ``preferred`` bytes, a frame, at a
        time); a frame it covers in part comes through the frame cache. On an error ``view``
        may hold unchecked bytes: the caller must not return them."""
        view = memoryview(view)
        self._fill(offset, view, self.segments(offset, len(view)), zeroed=False)

    def _fill(self, offset: int, view: memoryview, segments: list[Segment], zeroed: bool) -> None:
        for seg in segments:
            dst = view[seg.start - offset:seg.end - offset]
            if seg.kind != DATA:
                if not zeroed:
                    _zero(dst)
            elif self._whole(seg):
                self._read_whole(seg.layer, seg.frame, dst)
            else:
                skip = seg.start - self.layers[seg.layer].table.starts[seg.frame]
                dst[:] = memoryview(self.frame_data(seg.layer, seg.frame))[skip:skip + len(dst)]

    def _whole(self, seg: Segment) -> bool:
        table = self.layers[seg.layer].table
        return seg.start == table.starts[seg.frame] and seg.end == table.end(seg.frame)

    def _read_whole(self, li: int, i: int, dst: memoryview) -> None:
        layer = self.layers[li]
        cached = self.cache.get((li, layer.table.pos[i]))
        if cached is not None:
            dst[:] = cached
            return
        try:
            read_into = getattr(layer.reader, "read_into", None)
            if read_into is not None:
                read_into(layer.table.ref(i), dst)
            else:                                   # a reader without it (qcow2 point images)
                dst[:] = layer.reader.read(layer.table.ref(i))
        except errors.FormatError as err:
            raise source.describe(err, self._files) from err

    def frame_data(self, li: int, i: int) -> bytes:
        """The verified bytes of frame ``i`` of layer ``li`` (cached)."""
        layer = self.layers[li]
        def load() -> bytes:
            try:
                return bytes(layer.reader.read(layer.table.ref(i)))
            except errors.FormatError as err:
                raise source.describe(err, self._files) from err

        return self.cache.load((li, layer.table.pos[i]), load)

    def preferred_block_size(self) -> int:
        """The request size that lets a sequential reader take whole frames: the largest data
        frame of the chain rounded up to a power of two, 4 KiB .. 32 MiB."""
        longest = max((layer.table.longest_data() for layer in self.layers), default=0)
        return min(max(1 << max(longest - 1, 0).bit_length(), 4096), 32 << 20)


_ZEROS = memoryview(bytes(1 << 20))


def _zero(view: memoryview) -> None:
    for at in range(0, len(view), len(_ZEROS)):
        n = min(len(_ZEROS), len(view) - at)
        view[at:at + n] = _ZEROS[:n]


# -- opening ----------------------------------------------------------------------------

def select_chain(folder: str, until: str | None, disk: str | None) -> DiskChain:
    """The chain of one disk at ``until``; with ``disk`` None the set must hold one disk only."""
    selection = source.select(folder, until, disk)
    if len(selection.disks) != 1:
        names = ", ".join(c.disk for c in selection.disks)
        raise errors.UsageError(reason=f"point {selection.points[-1].name} holds disks {names}: choose one (-d DISK)")
    return selection.disks[0]


def open_point(folder: str, until: str | None = None, disk: str | None = None,
               cache_bytes: int = CACHE_BYTES) -> PointReader:
    """Open ``disk`` of ``folder`` at point ``until`` (newest when None) for random reads."""
    return open_chain(select_chain(folder, until, disk), cache_bytes)


def open_chain(chain: DiskChain, cache_bytes: int = CACHE_BYTES) -> PointReader:
    """Open every file of a selected chain, check it against the manifest and load its index."""
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(source.opened(cf)) for cf in chain.files]
        for cf, reader in zip(chain.files, readers, strict=True):
            source.check_against_entry(cf, reader)
        source.check_links(chain.files, [r.meta for r in readers])
        layers = list(_layers(chain.files, readers))
        point = PointReader(chain.disk, chain.files[-1].point, layers, stack.pop_all(), cache_bytes)
    return point


def _layers(files: Sequence[ChainFile], readers: Sequence[StreamReader]) -> Iterator[Layer]:
    limit = readers[-1].meta.virtual_size
    limits = []
    for reader in reversed(readers):
        limit = min(limit, reader.meta.virtual_size)
        limits.append(limit)
    for cf, reader, lim in zip(files, readers, reversed(limits), strict=True):
        try:
            table = _table(reader)
        except errors.FormatError as err:
            raise source.describe(err, files) from err
        yield Layer(cf, reader, table, lim)


def _table(reader: StreamReader) -> FrameTable:
    size = reader.meta.virtual_size
    if reader.meta.extra.get("legacy") or not hasattr(reader, "index_entries"):   # listed frames (qcow2 images)
        return frametable.from_refs(reader.path, reader.frames(), size)
    entries, index_pos, _ = reader.index_entries()
    return frametable.from_index(reader.path, entries, size, index_pos)
