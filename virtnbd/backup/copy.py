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
import errno
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass

from virtnbd import errors, fsutil
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


class ParallelFile:
    """Write-only file for StreamWriter that puts large writes on worker threads.

    Each ``write`` gets the next file position at once and, when large, is done
    by ``os.pwrite`` in a small pool, so copying into the page cache runs on
    several cores like nbdcopy's writers. The caller must keep a large buffer
    unchanged until :meth:`take_pending` futures are done (copy_disk releases a
    read buffer only then). ``flush`` waits for every write and raises the first
    error.
    """

    LARGE = 64 * 1024
    WRITEBACK_WINDOW = 32 << 20

    def __init__(self, fd: int, path: str, threads: int = 2, max_pending: int = 8) -> None:
        self.fd = fd
        self.path = path
        self.pos = 0
        self._written_back = 0
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="pwrite")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._pending: list[Future[None]] = []
        self._all: collections.deque[Future[None]] = collections.deque()

    def _pwrite(self, data: bytes | bytearray | memoryview, pos: int) -> None:
        try:
            view = memoryview(data)
            done = 0
            while done < len(view):
                n = os.pwrite(self.fd, view[done:], pos + done)
                if n <= 0:
                    raise OSError(errno.EIO, f"short write ({done} of {len(view)} bytes)")
                done += n
        finally:
            self._slots.release()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        length = len(data)
        pos, self.pos = self.pos, self.pos + length
        self._reap()
        self._slots.acquire()
        if length < self.LARGE:
            self._pwrite(data, pos)
            return length
        fut = self._pool.submit(self._pwrite, data, pos)
        self._pending.append(fut)
        self._all.append(fut)
        return length

    def _reap(self) -> None:
        while self._all and self._all[0].done():
            self._check(self._all.popleft())
        self._start_writeback()

    def _start_writeback(self) -> None:
        """Start writeback of what was written (up to two windows back) and drop it from the cache.

        The final fsync then finds little left to do (measured: 0.33 s -> 0.03 s
        for 1.5 GiB), and a backup does not push the host's useful page cache out.
        POSIX_FADV_DONTNEED never loses data: it starts writeback of dirty pages
        without waiting and drops only clean ones (a write still running is safe).
        """
        done_up_to = self.pos - 2 * self.WRITEBACK_WINDOW
        if done_up_to - self._written_back < self.WRITEBACK_WINDOW:
            return
        try:
            os.posix_fadvise(self.fd, self._written_back, done_up_to - self._written_back, os.POSIX_FADV_DONTNEED)
        except OSError:
            return
        self._written_back = done_up_to

    def _check(self, fut: Future[None]) -> None:
        err = fut.exception()
        if isinstance(err, OSError):
            raise fsutil.storage_error(self.path, err) from err
        if err is not None:
            raise err

    def take_pending(self) -> list[Future[None]]:
        """Futures of the large writes issued since the last call."""
        pending, self._pending = self._pending, []
        return pending

    def flush(self) -> None:
        while self._all:
            fut = self._all.popleft()
            fut.exception()
            self._check(fut)

    def close(self) -> None:
        """Wait for every write (errors are left to flush) and stop the threads."""
        self._pool.shutdown(wait=True)


def _release_after(chunk: Chunk, writes: list[Future[None]]) -> None:
    """Give the buffer back once the writes using it are done."""
    if not writes:
        chunk.release()
        return
    remaining = [len(writes)]
    lock = threading.Lock()

    def one_done(_fut: Future[None]) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            chunk.release()

    for fut in writes:
        fut.add_done_callback(one_done)


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
              cancel: threading.Event | None = None, out: ParallelFile | None = None) -> CopyStats:
    """Copy ``extents`` of ``source`` into ``writer``; returns what was written.

    ``out``: the ParallelFile the writer writes to, if any (buffers are released
    only after its writes of them are done).
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
            writes: list[Future[None]] = []
            try:
                if item.frame is not None:
                    frame = item.frame.result()
                    skip.compressed(frame)
                else:
                    frame = encode(chunk, None, None)
                writer.add(frame)
            finally:
                if out is not None:
                    writes = out.take_pending()
                _release_after(chunk, writes)
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
