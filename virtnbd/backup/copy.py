"""The copy loop of one disk: extents -> NBD reads -> encode -> StreamWriter.

Reads run ahead of the writer by at most the source's buffer pool (bounded
memory); frames reach the writer in ascending offset order. Uncompressed
frames are checksummed in the loop itself (xxh3 costs microseconds per MiB);
compression runs in a worker pool, and so does every frame of a stream with a
costly codec stage (encryption, which seals the read buffer in place). Data that
reads back as all zeros becomes a zero frame.
"""
from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Protocol

from virtnbd import errors
from virtnbd.source.extents import DATA, Extent, split
from virtnbd.source.nbdsource import Chunk, NbdSource
from virtnbd.stream.codec import Codec
from virtnbd.stream.format import EncodedFrame, StreamMeta

_ZEROS: dict[int, bytes] = {}


def _zeros(length: int) -> bytes:
    buf = _ZEROS.get(length)
    if buf is None:
        buf = bytes(length)
        if len(_ZEROS) < 8:
            _ZEROS[length] = buf
    return buf


def is_zero(chunk: Chunk) -> bool:
    buf, n = chunk.buffer, chunk.length
    if buf[0] or buf[n - 1]:
        return False
    # bytearray == bytes is a memcmp; a memoryview comparison would go byte by byte
    return (buf if n == len(buf) else buf[:n]) == _zeros(n)


class FrameSink(Protocol):
    """Where the copy loop puts frames: a StreamWriter, or a qcow2 image (backup/qcow2write.py)."""

    @property
    def codec(self) -> Codec: ...
    @property
    def meta(self) -> StreamMeta: ...
    def add(self, frame: EncodedFrame) -> None: ...


@dataclass
class CopyStats:
    data_bytes: int = 0         # bytes stored as data frames
    zero_bytes: int = 0         # bytes recorded as zero frames
    read_zero_bytes: int = 0    # read as data but all zeros -> zero frames
    frames: int = 0


def encode(chunk: Chunk, codec: Codec) -> EncodedFrame:
    """Data frame of a chunk through the writer's codec, or a zero frame when it is all zeros.

    The chunk's buffer is given up (``owned``): it goes back to the pool once the frame is
    written, so a stage may overwrite it in place (encryption: no frame-sized buffer per frame)."""
    if is_zero(chunk):
        return codec.encode_zero(chunk.offset, chunk.length)
    return codec.encode_data(chunk.offset, chunk.data, owned=True)


class CompressionProbe:
    """Stop compressing data that does not compress, and look again now and then.

    After ``streak`` frames in a row came out no smaller (stored raw anyway), the
    next ``pause`` frames are stored raw without trying; then one frame is tried
    again. Each probe that fails doubles the pause (up to ``max_pause``); a frame
    that compresses resets it. Incompressible disks then cost almost no
    compression CPU, and compressible regions are found again quickly.
    """

    def __init__(self, streak: int = 4, pause: int = 64, max_pause: int = 1024) -> None:
        self.streak = streak
        self.first_pause = pause
        self.pause = pause
        self.max_pause = max_pause
        self.failed = 0
        self.skip_left = 0
        self.skipped = 0
        self.probing = False

    def try_compress(self) -> bool:
        if self.skip_left > 0:
            self.skip_left -= 1
            self.skipped += 1
            if self.skip_left == 0:
                self.probing = True
            return False
        return True

    def compressed(self, frame: EncodedFrame) -> None:
        if frame.kind != DATA:
            return
        if len(frame.payload) < frame.length:
            self.failed = 0
            self.pause = self.first_pause
            self.probing = False
            return
        if self.probing:
            self.pause = min(self.pause * 2, self.max_pause)
            self.skip_left = self.pause
            return
        self.failed += 1
        if self.failed >= self.streak:
            self.failed = 0
            self.skip_left = self.pause


class _Item:
    """One extent on its way to the writer."""

    __slots__ = ("compressing", "ext", "frame", "read")

    def __init__(self, ext: Extent, read: Future[Chunk] | None) -> None:
        self.ext = ext
        self.read = read
        self.frame: Future[EncodedFrame] | None = None
        self.compressing = False      # encoded in the pool with compression (else: without, or in the loop)

    def ready(self) -> bool:
        if self.read is None:
            return True
        return (self.frame or self.read).done()

    def compress_in(self, pool: Executor, codec: Codec) -> None:
        """Chain: read done -> encode in the pool -> ``self.frame``.

        The callbacks capture only the futures they complete, never ``self``:
        no reference cycle, so a frame's buffers go away as soon as it is written
        (cycles would wait for the garbage collector and hold compressed payloads).
        """
        frame: Future[EncodedFrame] = Future()
        self.frame = frame

        def encoded_done(encoded: Future[EncodedFrame]) -> None:
            err = encoded.exception()
            if err is not None:
                frame.set_exception(err)
            else:
                frame.set_result(encoded.result())

        def read_done(read: Future[Chunk]) -> None:
            err = read.exception()
            if err is not None:
                frame.set_exception(err)
                return
            try:
                encoded = pool.submit(encode, read.result(), codec)
            except RuntimeError as exc:   # pool shut down: the run is ending
                frame.set_exception(exc)
                return
            encoded.add_done_callback(encoded_done)

        if self.read is not None:
            self.read.add_done_callback(read_done)

    def discard(self) -> None:
        """Give the buffer back after a failure (waits for the read to end)."""
        if self.read is None:
            return
        with contextlib.suppress(Exception):
            if self.frame is not None:
                self.frame.exception(timeout=60)
            if self.read.exception(timeout=60) is None:
                self.read.result().release()


def copy_disk(source: NbdSource, writer: FrameSink, extents: Iterable[Extent], pool: Executor, *,
              read_size: int, progress: Callable[[int], None] | None = None,
              cancel: threading.Event | None = None) -> CopyStats:
    """Copy ``extents`` of ``source`` into ``writer``; returns what was written.

    Frames are encoded with the writer's codec (``writer.codec``), compressed
    ones in ``pool``. The writer's file must have written or copied a payload
    when ``add`` returns (a plain file or
    :class:`~virtnbd.backup.outfile.StagedFile`): the read buffer goes back to
    the pool right after.
    """
    loop = _CopyLoop(source, writer, pool, progress)
    try:
        for ext in split(extents, min(read_size, source.pool.size)):
            if cancel is not None and cancel.is_set():
                raise errors.NbdError(export=source.export, reason="copy cancelled")
            loop.submit(ext)
            loop.emit_ready()
        loop.drain()
    except BaseException:
        loop.discard()
        raise
    return loop.stats


class _CopyLoop:
    """State of one copy: reads in flight (at most the source's buffer count), frames in order."""

    def __init__(self, source: NbdSource, writer: FrameSink, pool: Executor,
                 progress: Callable[[int], None] | None) -> None:
        self.source = source
        self.writer = writer
        self.pool = pool
        self.progress = progress
        self.compressing = writer.meta.compression is not None
        self.in_pool = writer.codec.encode_in_pool      # a costly stage (encryption): every frame in the pool
        self.stats = CopyStats()
        self.skip = CompressionProbe()
        self.pending: collections.deque[_Item] = collections.deque()
        self.max_reads = max(1, source.pool.count)
        self.reads = 0

    def submit(self, ext: Extent) -> None:
        """Queue one extent: a data extent starts its read (and its compression when it is done)."""
        if ext.kind != DATA:
            self.pending.append(_Item(ext, None))
            return
        while self.reads >= self.max_reads:
            self.emit()
        item = _Item(ext, self.source.read(ext.offset, ext.length))
        if self.compressing and self.skip.try_compress():
            item.compress_in(self.pool, self.writer.codec)
            item.compressing = True
        elif self.in_pool:
            item.compress_in(self.pool, self.writer.codec.uncompressed)
        self.reads += 1
        self.pending.append(item)

    def emit_ready(self) -> None:
        while self.pending and self.pending[0].ready():
            self.emit()

    def drain(self) -> None:
        while self.pending:
            self.emit()

    def emit(self) -> None:
        """Hand the oldest queued extent to the writer (waits for its read / compression)."""
        item = self.pending.popleft()
        ext = item.ext
        if item.read is None:
            self.writer.add(self.writer.codec.encode_zero(ext.offset, ext.length))
            self.stats.zero_bytes += ext.length
        elif self._emit_read(item, item.read) == DATA:
            self.stats.data_bytes += ext.length
        else:
            self.stats.zero_bytes += ext.length
            self.stats.read_zero_bytes += ext.length
        self.stats.frames += 1
        if self.progress is not None:
            self.progress(ext.length)

    def _emit_read(self, item: _Item, read: Future[Chunk]) -> str:
        """Write the frame of a read extent, give its buffer back; the frame's kind."""
        self.reads -= 1
        chunk = read.result()
        try:
            if item.frame is not None:
                frame = item.frame.result()
                if item.compressing:
                    self.skip.compressed(frame)
            else:
                frame = encode(chunk, self.writer.codec.uncompressed)
            self.writer.add(frame)
        finally:
            chunk.release()
            item.read = item.frame = None
        return frame.kind

    def discard(self) -> None:
        for item in self.pending:
            item.discard()
