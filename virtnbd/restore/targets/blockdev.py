"""Restore straight onto a block device (``-o /dev/...``): raw, in place, refused while in use.

A device in use is refused before a byte is written: listed in
/proc/mounts, held by another device (/sys/class/block/<dev>/holders, e.g.
LVM or dm-crypt), or not openable with O_EXCL (the kernel's own in-use
check). The device is not known to be zeroed, so zero ranges are written as
zeroes (BLKZEROOUT, which uses the device's write-zeroes support). A device
cannot be renamed into place: a failed restore leaves it partly written, and
says so.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import struct
import threading
from pathlib import Path

from virtnbd import errors
from virtnbd.fsutil import storage_error
from virtnbd.restore.targets import TargetBase, TargetRequest
from virtnbd.restore.targets.raw import pwrite_all

log = logging.getLogger(__name__)

SCHEME = "blockdev"
BLKZEROOUT = 0x127F            # _IO(0x12, 127)
SECTOR = 512
ZERO_CHUNK = 1 << 20


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def in_use(path: str) -> str | None:
    """Why ``path`` is in use (mounted, held), or None."""
    rdev = os.stat(path).st_rdev
    with contextlib.suppress(OSError), open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            source, mountpoint = line.split()[:2]
            if source.startswith("/") and is_block_device(source) and os.stat(source).st_rdev == rdev:
                return f"mounted on {mountpoint}"
    holders = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/holders")
    with contextlib.suppress(OSError):
        held = sorted(p.name for p in holders.iterdir())
        if held:
            return f"held by {', '.join(held)}"
    return None


class BlockDeviceTarget(TargetBase):
    def __init__(self, request: TargetRequest) -> None:
        self.path = self.name = request.spec.partition(":")[2]
        self.bytes_written = 0
        self._lock = threading.Lock()
        if not is_block_device(self.path):
            raise errors.UsageError(reason=f"{self.path}: not a block device")
        why = in_use(self.path)
        if why:
            raise errors.StorageError(path=self.path, reason=f"in use ({why}), refusing to overwrite it")
        try:
            self.fd: int | None = os.open(self.path, os.O_WRONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError as err:
            raise storage_error(self.path, err) from err
        size = os.lseek(self.fd, 0, os.SEEK_END)
        if size < request.virtual_size:
            self.abort()
            raise errors.StorageError(path=self.path, reason=f"device holds {size} bytes, the disk needs "
                                                             f"{request.virtual_size}")

    def _fd(self) -> int:
        if self.fd is None:
            raise errors.StorageError(path=self.path, reason="write after close")
        return self.fd

    def write(self, offset: int, data: bytes | memoryview) -> None:
        try:
            pwrite_all(self._fd(), data, offset)
        except OSError as err:
            raise storage_error(self.path, err) from err
        with self._lock:
            self.bytes_written += len(data)

    def zero(self, offset: int, length: int) -> None:
        """The device is not known to be zeroed: zero the range on it."""
        fd = self._fd()
        try:
            if offset % SECTOR == 0 and length % SECTOR == 0:
                fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
                return
        except OSError:
            log.debug("BLKZEROOUT failed on %s; writing zeroes", self.path)
        end = offset + length
        zeros = bytes(min(ZERO_CHUNK, length))
        while offset < end:
            n = min(len(zeros), end - offset)
            pwrite_all(fd, memoryview(zeros)[:n], offset)
            offset += n

    def commit(self) -> None:
        fd = self._fd()
        try:
            os.fsync(fd)
        except OSError as err:
            self.abort()
            raise storage_error(self.path, err) from err
        os.close(fd)
        self.fd = None

    def abort(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
            log.warning("%s: restore did not finish; the device is partly written", self.path)


def open_blockdev(request: TargetRequest) -> BlockDeviceTarget:
    return BlockDeviceTarget(request)
