"""The output file of one disk's stream: staged in aligned blocks, written by one thread.

A backup writes each byte once and never reads it back. :class:`StagedFile`
copies what the stream writer hands it into a few page-aligned staging blocks
(the caller's buffers are free again as soon as :meth:`StagedFile.write`
returns) and a background thread writes every full block, in one of two ways
(:class:`WriteMode`: the first, until the disk turns out to be the bottleneck):

* ``O_DIRECT``: no copy into the page cache, the least CPU. Best while the
  writer keeps up, i.e. the backup is bound by the CPU (1.5 GiB of text with
  lz4 on 2 cores: 1.71-1.75 s against 1.67-1.97 s with writeback).
* the page cache with pipelined writeback, as nbdcopy does:
  ``sync_file_range`` starts each block's writeback at once, waits for the one
  ``WRITEBACK_LAG`` behind and drops its pages. More writes reach the disk at a
  time than one O_DIRECT write after the other, for ~0.3 CPU-s per 1.5 GiB.
  Best when the writer falls behind, i.e. the disk is the bottleneck (1.5 GiB
  uncompressed: 1.00-1.07 s against 1.15-1.27 s with O_DIRECT, measured here).
  The host's page cache holds at most ``WRITEBACK_LAG`` of the stream.

Where the filesystem refuses ``O_DIRECT`` (tmpfs, some network filesystems)
every block takes the second way. The last, partial block is written padded to
the alignment and the file then cut to its length. The whole-file digest is
computed here, as the data is staged (the caller writes in file order), so the
writer thread does nothing but write (StreamWriter sees ``hashes_data``).
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
WRITEBACK_LAG = 4 * BLOCK       # page-cache mode: wait for the writeback this far behind, drop those pages


class WriteMode:
    """O_DIRECT for the next block, or the page cache, from the writer's backlog.

    A stream starts with O_DIRECT. While the writer keeps up, the backup is
    bound by the CPU and O_DIRECT saves the copy into the page cache. When all
    but one staging block are queued for ``patience`` blocks in a row, the disk
    is the bottleneck: the rest of the stream goes through the page cache with
    pipelined writeback, which gets more writes to the disk at a time. The
    switch is one way: with writeback the writer catches up in bursts, so its
    backlog no longer tells the two cases apart (switching back and forth was
    tried: 21 switches per 1.5 GiB and no gain). ``adaptive=False`` keeps the
    first mode.
    """

    def __init__(self, direct: bool, *, adaptive: bool = True, patience: int = 4) -> None:
        self.direct = direct
        self.adaptive = adaptive and direct
        self.patience = patience
        self.switches = 0
        self._streak = 0

    def choose(self, queued: int, blocks: int) -> bool:
        """Mode of the block handed over while ``queued`` of ``blocks`` wait to be written."""
        if not self.adaptive:
            return self.direct
        self._streak = self._streak + 1 if queued >= blocks - 1 else 0
        if self._streak >= self.patience:
            self.direct = self.adaptive = False
            self.switches += 1
        return self.direct


class StagedFile:
    """Write-only, sequential file for StreamWriter; use as a context manager.

    ``path`` must exist (``fsutil.partial_file`` created it); it is opened again
    here, through the page cache and (where the filesystem allows it) with
    ``O_DIRECT``. The owner of the first descriptor fsyncs and renames the file
    afterwards. ``direct``: None chooses per block (:class:`WriteMode`), True
    always O_DIRECT, False always the page cache.
    """

    hashes_data = True

    def __init__(self, path: str, *, direct: bool | None = None, block: int = BLOCK, blocks: int = BLOCKS) -> None:
        if block % ALIGN or block <= 0 or blocks < 2:
            raise errors.UsageError(reason=f"staging block {block} must be a positive multiple of {ALIGN}")
        self.path = path
        self.block = block
        self.blocks = blocks
        self.mode = WriteMode(direct is not False, adaptive=direct is None)
        self.fd = self._open(os.O_WRONLY)
        self._fd_direct = self._open_direct() if direct is not False else -1
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

    def _open(self, flags: int) -> int:
        try:
            return os.open(self.path, flags)
        except OSError as err:
            raise fsutil.storage_error(self.path, err) from err

    def _open_direct(self) -> int:
        try:
            return os.open(self.path, os.O_WRONLY | os.O_DIRECT)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise fsutil.storage_error(self.path, err) from err
            log.debug("%s: no O_DIRECT here (%s), writing through the page cache", self.path, err.strerror)
            self._no_direct()
            return -1

    def _no_direct(self) -> None:
        self.mode.direct = self.mode.adaptive = False

    @property
    def direct(self) -> bool:
        """Whether the next block is to be written with O_DIRECT."""
        return self._fd_direct >= 0 and self.mode.direct

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
        """Wait for the writer thread (errors are left to flush) and close our descriptors."""
        self._pool.shutdown(wait=True)
        log.debug("%s: %d bytes, O_DIRECT %s, %d write mode switch(es)", self.path, self.pos,
                  "available" if self._fd_direct >= 0 else "not used", self.mode.switches)
        for fd in (self.fd, self._fd_direct):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self._fd_direct = -1

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
        direct = self._fd_direct >= 0 and self.mode.choose(len(self._inflight), self.blocks)
        fut = self._pool.submit(self._write_block, buf, size, self._block_pos, keep, direct)
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
    def _write_block(self, buf: mmap.mmap, size: int, pos: int, keep: bool, direct: bool) -> None:
        try:
            view = memoryview(buf)[:size]
            done = 0
            while done < size:
                n, direct = self._pwrite(view[done:], pos + done, direct)
                if n <= 0:
                    raise OSError(errno.EIO, f"short write at {pos + done}")
                done += n
            view.release()
            if not direct:
                self._writeback(pos, pos + size)
        finally:
            if not keep:
                self._free.put(buf)

    def _pwrite(self, data: memoryview, pos: int, direct: bool) -> tuple[int, bool]:
        """One pwrite -> (bytes, whether it was O_DIRECT). A filesystem that opens
        O_DIRECT but refuses its writes (EINVAL) gets the page cache from then on."""
        if direct and self._fd_direct >= 0:
            try:
                return os.pwrite(self._fd_direct, data, pos), True
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
                log.debug("%s: O_DIRECT write refused (%s), writing through the page cache", self.path, err.strerror)
            fd, self._fd_direct = self._fd_direct, -1
            self._no_direct()
            os.close(fd)
        return os.pwrite(self.fd, data, pos), False

    def _writeback(self, start: int, end: int) -> None:
        """Page-cache mode: start writing ``[start, end)`` out now; wait for what is
        ``WRITEBACK_LAG`` behind to be on disk and drop it from the cache.

        Errors are left to the owner's fsync, which reports failed writeback."""
        upto = end - WRITEBACK_LAG
        fsutil.sync_file_range(self.fd, start, end - start, fsutil.SFR_WRITE)
        if upto > self._written_back:
            fsutil.sync_file_range(self.fd, self._written_back, upto - self._written_back,
                                   fsutil.SFR_WAIT_BEFORE | fsutil.SFR_WRITE | fsutil.SFR_WAIT_AFTER)
            with contextlib.suppress(OSError):
                os.posix_fadvise(self.fd, self._written_back, upto - self._written_back, os.POSIX_FADV_DONTNEED)
            self._written_back = upto
