"""The output file of one disk's stream: staged in aligned blocks, written with O_DIRECT.

A backup writes each byte once and never reads it back, so the page cache only
costs: copying into it, block allocation and writeback in our threads, and
pushing the host's useful cache out. :class:`StagedFile` copies what the stream
writer hands it into a few page-aligned staging blocks and writes every full
block with ``O_DIRECT`` from one background thread (measured here, 1.5 GiB:
0.55 s and 0.1 s of CPU, against 0.45 s and 0.55 s of CPU buffered with early
writeback; the CPU it saves goes to the NBD reads). The caller's buffers are
free again as soon as :meth:`StagedFile.write` returns.

The last, partial block is written padded to the alignment and the file then
cut to its length. Where the filesystem refuses ``O_DIRECT`` (tmpfs, some
network filesystems) the same blocks go through the page cache, with
writeback started a few blocks behind so the final fsync has little left.
The whole-file digest is computed here, as the data is staged (the caller
writes in file order), so the writer thread does nothing but write: under
load the device is the bottleneck of an uncompressed backup, and hashing
between its writes left it idle ~6 % of the time (StreamWriter sees
``hashes_data``).
"""
from __future__ import annotations

import collections
import contextlib
import errno
import logging
import mmap
import os
import queue
from concurrent.futures import Future, ThreadPoolExecutor

import xxhash

from virtnbd import errors, fsutil

log = logging.getLogger(__name__)

ALIGN = 4096                    # O_DIRECT alignment of offsets, lengths and buffers
BLOCK = 4 << 20                 # bytes per staging block (and per write)
BLOCKS = 8                      # staging blocks: one filling, the others being written
WRITEBACK_LAG = 8 * BLOCK       # buffered fallback: start writeback this far behind


class StagedFile:
    """Write-only, sequential file for StreamWriter; use as a context manager.

    ``path`` must exist (``fsutil.partial_file`` created it); it is opened a
    second time here, with ``O_DIRECT`` where the filesystem allows it. The
    owner of the first descriptor fsyncs and renames the file afterwards.
    """

    hashes_data = True

    def __init__(self, path: str, *, direct: bool = True, block: int = BLOCK, blocks: int = BLOCKS) -> None:
        if block % ALIGN or block <= 0 or blocks < 2:
            raise errors.UsageError(reason=f"staging block {block} must be a positive multiple of {ALIGN}")
        self.path = path
        self.block = block
        self.direct = direct
        self.fd = self._open(path)
        self._hash = xxhash.xxh3_128()
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        for _ in range(blocks):
            self._free.put(mmap.mmap(-1, block))
        self._buf: mmap.mmap | None = None
        self._fill = 0              # bytes in the current block
        self._block_pos = 0         # file position of the current block
        self._written_back = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="write")
        self._inflight: collections.deque[Future[None]] = collections.deque()

    def _open(self, path: str) -> int:
        flags = os.O_WRONLY
        if self.direct:
            try:
                return os.open(path, flags | os.O_DIRECT)
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise fsutil.storage_error(path, err) from err
                log.debug("%s: no O_DIRECT here (%s), writing through the page cache", path, err.strerror)
                self.direct = False
        try:
            return os.open(path, flags)
        except OSError as err:
            raise fsutil.storage_error(path, err) from err

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pos(self) -> int:
        return self._block_pos + self._fill

    # -- the caller's side ---------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Copy ``data`` into the staging blocks; full blocks go to the writer thread."""
        view = memoryview(data).cast("B")
        self._hash.update(view)
        done = 0
        while done < len(view):
            if self._buf is None:
                self._buf = self._take_block()
            n = min(len(view) - done, self.block - self._fill)
            self._buf[self._fill:self._fill + n] = view[done:done + n]
            self._fill += n
            done += n
            if self._fill == self.block:
                self._submit(self._buf, self.block, keep=False)
                self._block_pos += self.block
                self._buf, self._fill = None, 0
        return done

    def flush(self) -> None:
        """Write what is staged (the partial block padded, the file cut to length); wait; raise the first error."""
        if self._buf is not None and self._fill:
            padded = -(-self._fill // ALIGN) * ALIGN
            self._buf[self._fill:padded] = bytes(padded - self._fill)
            self._submit(self._buf, padded, keep=True)
        while self._inflight:
            self._check(self._inflight.popleft())
        try:
            os.ftruncate(self.fd, self.pos)
        except OSError as err:
            raise fsutil.storage_error(self.path, err) from err

    def hexdigest(self) -> str:
        """xxh3-128 of everything written (after :meth:`flush`)."""
        return self._hash.hexdigest()

    def close(self) -> None:
        """Wait for the writer thread (errors are left to flush) and close our descriptor."""
        self._pool.shutdown(wait=True)
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    # -- blocks ----------------------------------------------------------------
    def _take_block(self) -> mmap.mmap:
        while True:
            try:
                return self._free.get_nowait()
            except queue.Empty:
                pass
            if not self._inflight:
                raise errors.UsageError(reason=f"{self.path}: no free staging block")
            self._check(self._inflight.popleft())

    def _submit(self, buf: mmap.mmap, size: int, *, keep: bool) -> None:
        """Write ``size`` bytes of ``buf`` at the current block position.

        ``keep``: the block stays the current one (a flushed partial block that
        later writes go on filling), so it is not given back.
        """
        while self._inflight and self._inflight[0].done():
            self._check(self._inflight.popleft())
        fut = self._pool.submit(self._write_block, buf, size, self._block_pos, keep)
        self._inflight.append(fut)
        if keep:                  # the block is filled on after the flush: wait for its write
            self._check(self._inflight.pop())

    def _check(self, fut: Future[None]) -> None:
        err = fut.exception()
        if isinstance(err, OSError):
            raise fsutil.storage_error(self.path, err) from err
        if err is not None:
            raise err

    # -- the writer thread -----------------------------------------------------------
    def _write_block(self, buf: mmap.mmap, size: int, pos: int, keep: bool) -> None:
        try:
            view = memoryview(buf)[:size]
            done = 0
            while done < size:
                n = self._pwrite(view[done:], pos + done)
                if n <= 0:
                    raise OSError(errno.EIO, f"short write at {pos + done}")
                done += n
            view.release()
            if not self.direct:
                self._start_writeback(pos + size)
        finally:
            if not keep:
                self._free.put(buf)

    def _pwrite(self, data: memoryview, pos: int) -> int:
        """One pwrite; a filesystem that opens O_DIRECT but refuses its writes gets the page cache."""
        try:
            return os.pwrite(self.fd, data, pos)
        except OSError as err:
            if not (self.direct and err.errno == errno.EINVAL):
                raise
            log.debug("%s: O_DIRECT write refused (%s), writing through the page cache", self.path, err.strerror)
        old, self.direct = self.fd, False
        self.fd = self._open(self.path)
        os.close(old)
        return os.pwrite(self.fd, data, pos)

    def _start_writeback(self, end: int) -> None:
        """Buffered fallback: start writeback well behind ``end`` and drop those pages."""
        upto = end - WRITEBACK_LAG
        if upto - self._written_back < WRITEBACK_LAG:
            return
        with contextlib.suppress(OSError):
            os.posix_fadvise(self.fd, self._written_back, upto - self._written_back, os.POSIX_FADV_DONTNEED)
        self._written_back = upto
