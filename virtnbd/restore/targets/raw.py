"""Raw image target: positional writes from many threads, holes for zeroes, rename on commit."""
from __future__ import annotations

import contextlib
import logging
import os
import threading

from virtnbd import errors, fsutil
from virtnbd.fsutil import PARTIAL_SUFFIX, fsync_dir, storage_error
from virtnbd.restore.targets.base import TargetBase, TargetRequest

log = logging.getLogger(__name__)


def temp_name(path: str) -> str:
    return path + PARTIAL_SUFFIX


def refuse_existing(path: str) -> None:
    if os.path.lexists(path):
        raise errors.StorageError(path=path, reason="exists already, refusing to overwrite")


WRITEBACK_EVERY = 64 << 20

def start_writeback(fd: int) -> None:
    """Start writing the file's dirty pages now (no wait), so the final fsync has little left to do."""
    fsutil.sync_file_range(fd, 0, 0, fsutil.SFR_WRITE)


def pwrite_all(fd: int, data: bytes | memoryview, pos: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


class FileTarget(TargetBase):
    """A new file written under ``<path>.partial`` and renamed on commit (shared by raw and qcow2direct)."""

    def __init__(self, request: TargetRequest) -> None:
        self.name = request.spec
        self.path = request.spec
        self.tmp = temp_name(self.path)
        self.virtual_size = request.virtual_size
        self.bytes_written = 0
        self.zero_bytes = 0
        self._lock = threading.Lock()
        self._dirty = 0
        self.fd: int | None = None
        refuse_existing(self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)  # left over by a killed run
        try:
            self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise storage_error(self.tmp, err) from err

    def _fd(self, what: str) -> int:
        if self.fd is None:
            raise errors.StorageError(path=self.tmp, reason=f"{what} after close")
        return self.fd

    def _count(self, written: int = 0, zero: int = 0) -> None:
        with self._lock:
            self.bytes_written += written
            self.zero_bytes += zero
            self._dirty += written
            kick = self._dirty >= WRITEBACK_EVERY
            if kick:
                self._dirty = 0
        if kick and self.fd is not None:
            start_writeback(self.fd)

    def zero(self, offset: int, length: int) -> None:
        # A fresh (or preallocated) file reads zero wherever nothing was written: nothing to do.
        self._count(zero=length)

    def finish(self) -> None:
        """Subclasses write their last bytes (metadata) here, before the fsync."""

    def complete(self) -> None:
        """Last bytes written, fsynced and closed, still under the partial name (``commit`` renames)."""
        fd = self._fd("commit")
        self.finish()
        os.fsync(fd)
        os.close(fd)
        self.fd = None

    def commit(self) -> None:
        try:
            self.complete()
            os.replace(self.tmp, self.path)
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        except OSError as err:
            self.abort()
            raise storage_error(self.path, err) from err
        log.debug("%s: %d bytes written", self.path, self.bytes_written)

    def abort(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class RawTarget(FileTarget):
    """A sparse raw file, written with os.pwrite (thread-safe, no shared file offset).

    The file is fresh, so ranges the plan marks zero are left as holes: nothing
    is written for them and the result stays as thin as the source. With
    ``preallocate`` the whole size is allocated first (posix_fallocate), whose
    unwritten extents read back as zeroes, so zero ranges are skipped then too.
    """

    def __init__(self, request: TargetRequest) -> None:
        super().__init__(request)
        try:
            os.ftruncate(self._fd("truncate"), self.virtual_size)
            if request.preallocate and self.virtual_size:
                os.posix_fallocate(self._fd("fallocate"), 0, self.virtual_size)
        except OSError as err:
            self.abort()
            raise storage_error(self.tmp, err) from err

    def write(self, offset: int, data: bytes | memoryview) -> None:
        try:
            pwrite_all(self._fd("write"), data, offset)
        except OSError as err:
            raise storage_error(self.tmp, err) from err
        self._count(written=len(data))

    def write_many(self, pieces: list[tuple[int, memoryview]]) -> int:
        """Several ``(offset, data)`` writes (one batch of a restore), counted once; the bytes written."""
        fd, total = self._fd("write"), 0
        try:
            for offset, data in pieces:
                if os.pwrite(fd, data, offset) != len(data):
                    pwrite_all(fd, data, offset)     # short write: again, to the end
                total += len(data)
        except OSError as err:
            raise storage_error(self.tmp, err) from err
        self._count(written=total)
        return total
