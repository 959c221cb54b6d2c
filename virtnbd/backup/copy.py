"""The copy loop of one disk: extents -> NBD reads -> encode -> StreamWriter.

Reads run ahead of the writer by at most the source's buffer pool (bounded
memory); frames reach the writer in ascending offset order. Uncompressed
frames are checksummed in the loop itself (xxh3 costs microseconds per MiB);
compression runs in a worker pool. Data that reads back as all zeros becomes a
zero frame.
"""
from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass

from virtnbd import errors
from virtnbd.extents import DATA, Extent, split
from virtnbd.nbdsource import Chunk, NbdSource
from virtnbd.stream.format import EncodedFrame
from virtnbd.stream.writer import StreamWriter, encode_data, encode_zero

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


@dataclass
class CopyStats:
    data_bytes: int = 0         # bytes stored as data frames
    zero_bytes: int = 0         # bytes recorded as zero frames
    read_zero_bytes: int = 0    # read as data but all zeros -> zero frames
    frames: int = 0


def encode(chunk: Chunk, method: str | None, level: int | None) -> EncodedFrame:
    """Data frame of a chunk, or a zero frame when it is all zeros."""
    if is_zero(chunk):
        return encode_zero(chunk.offset, chunk.length)
    return encode_data(chunk.offset, chunk.data, method, level)


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

    __slots__ = ("ext", "frame", "read")

    def __init__(self, ext: Extent, read: Future[Chunk] | None) -> None:
        self.ext = ext
        self.read = read
        self.frame: Future[EncodedFrame] | None = None

    def ready(self) -> bool:
        if self.read is None:
            return True
        return (self.frame or self.read).done()

    def compress_in(self, pool: Executor, method: str, level: int | None) -> None:
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
                encoded = pool.submit(encode, read.result(), method, level)
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


def copy_disk(source: NbdSource, writer: StreamWriter, extents: Iterable[Extent], pool: Executor, *,
              read_size: int, level: int | None = None,
              progress: Callable[[int], None] | None = None,
              cancel: threading.Event | None = None) -> CopyStats:
    """Copy ``extents`` of ``source`` into ``writer``; returns what was written.

    The writer's file must have written or copied a payload when ``add``
    returns (a plain file or :class:`~virtnbd.backup.outfile.StagedFile`): the
    read buffer goes back to the pool right after.
    """
    stats = CopyStats()
    method = writer.meta.compression
    skip = CompressionProbe()
    pending: collections.deque[_Item] = collections.deque()
    max_reads = max(1, source.pool.count)
    reads = 0
    chunk_size = min(read_size, source.pool.size)

    def emit() -> None:
        nonlocal reads
        item = pending.popleft()
        ext = item.ext
        if item.read is None:
            writer.add(encode_zero(ext.offset, ext.length))
            stats.zero_bytes += ext.length
        else:
            reads -= 1
            chunk = item.read.result()
            try:
                if item.frame is not None:
                    frame = item.frame.result()
                    skip.compressed(frame)
                else:
                    frame = encode(chunk, None, None)
                writer.add(frame)
            finally:
                chunk.release()
                item.read = item.frame = None
            if frame.kind == DATA:
                stats.data_bytes += ext.length
            else:
                stats.zero_bytes += ext.length
                stats.read_zero_bytes += ext.length
        stats.frames += 1
        if progress is not None:
            progress(ext.length)

    try:
        for ext in split(extents, chunk_size):
            if cancel is not None and cancel.is_set():
                raise errors.NbdError(export=source.export, reason="copy cancelled")
            if ext.kind == DATA:
                while reads >= max_reads:
                    emit()
                item = _Item(ext, source.read(ext.offset, ext.length))
                if method is not None and skip.try_compress():
                    item.compress_in(pool, method, level)
                reads += 1
            else:
                item = _Item(ext, None)
            pending.append(item)
            while pending and pending[0].ready():
                emit()
        while pending:
            emit()
    except BaseException:
        for item in pending:
            item.discard()
        raise
    return stats
