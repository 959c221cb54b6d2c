"""Raw image target: positional writes from many threads, holes for zeroes, rename on commit."""
from __future__ import annotations

import contextlib
import logging
import os
import threading

from virtnbd import errors
from virtnbd.fsutil import PARTIAL_SUFFIX, fsync_dir, storage_error
from virtnbd.restore.targets import TargetBase, TargetRequest

log = logging.getLogger(__name__)


def temp_name(path: str) -> str:
    return path + PARTIAL_SUFFIX


def refuse_existing(path: str) -> None:
    if os.path.lexists(path):
        raise errors.StorageError(path=path, reason="exists already, refusing to overwrite")


class RawTarget(TargetBase):
    """A sparse raw file, written with os.pwrite (thread-safe, no shared file offset).

    The file is fresh, so ranges the plan marks zero are left as holes: nothing
    is written for them and the result stays as thin as the source. With
    ``preallocate`` the whole size is allocated first (posix_fallocate), whose
    unwritten extents read back as zeroes, so zero ranges are skipped then too.
    """

    def __init__(self, request: TargetRequest) -> None:
        self.name = request.spec
        self.path = request.spec
        self.tmp = temp_name(self.path)
        self.virtual_size = request.virtual_size
        self.bytes_written = 0
        self.zero_bytes = 0
        self._lock = threading.Lock()
        refuse_existing(self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)  # left over by a killed run
        try:
            self.fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.ftruncate(self.fd, self.virtual_size)
            if request.preallocate and self.virtual_size:
                os.posix_fallocate(self.fd, 0, self.virtual_size)
        except OSError as err:
            self.abort()
            raise storage_error(self.tmp, err) from err

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if self.fd is None:
            raise errors.StorageError(path=self.tmp, reason="write after close")
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as err:
            raise storage_error(self.tmp, err) from err
        with self._lock:
            self.bytes_written += len(data)

    def zero(self, offset: int, length: int) -> None:
        # A fresh (or preallocated) file reads zero wherever nothing was written.
        with self._lock:
            self.zero_bytes += length

    def commit(self) -> None:
        if self.fd is None:
            raise errors.StorageError(path=self.tmp, reason="commit after close")
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
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
