"""Durable file operations: temp file, fsync, rename, fsync of the folder."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, cast

from virtnbd import errors

PARTIAL_SUFFIX = ".partial"

SFR_WAIT_BEFORE, SFR_WRITE, SFR_WAIT_AFTER = 1, 2, 4     # sync_file_range flags, <fcntl.h>


def _load_sync_file_range() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return cast(Callable[..., int], fn)


_SYNC_FILE_RANGE = _load_sync_file_range()


def sync_file_range(fd: int, offset: int, nbytes: int, flags: int) -> None:
    """Linux sync_file_range(2) (the os module lacks it); a no-op where libc has none.

    Errors are left to the file's fsync, which reports failed writeback."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, flags)


def partial_path(path: str | os.PathLike[str]) -> Path:
    """Where :func:`partial_file` writes ``path`` until it is complete."""
    target = Path(path)
    return target.with_name(target.name + PARTIAL_SUFFIX)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def storage_error(path: str | os.PathLike[str], err: OSError) -> errors.StorageError:
    reason = "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    return errors.StorageError(path=str(path), reason=reason)


def save_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise storage_error(target, err) from err


@contextlib.contextmanager
def partial_file(path: str | os.PathLike[str], mode: int = 0o600) -> Iterator[BinaryIO]:
    """Yield a file open for writing under ``path + .partial``.

    On normal exit the data is fsynced and renamed to ``path`` (and the folder
    fsynced); on any exception the partial file is removed.
    """
    target = Path(path)
    tmp = partial_path(target)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    except OSError as err:
        raise storage_error(tmp, err) from err
    f = os.fdopen(fd, "wb")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as err:
        f.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise storage_error(target, err) from err
    except BaseException:
        f.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def apply_modes(folder: Path, umask: int | None) -> None:
    """With an explicit umask, give everything in ``folder`` the modes it implies (files 0666, folders 0777 masked)."""
    if umask is None or not folder.is_dir():
        return
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    with contextlib.suppress(OSError):
        os.chmod(folder, dir_mode)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(root, name), file_mode)


class TextSink:
    """Text written straight to a binary sink as UTF-8: nothing buffered, so nothing can fail at close
    (a log stream whose folder turned read-only must not hide the run's own error)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw

    def write(self, text: str) -> int:
        return self.raw.write(text.encode("utf-8"))

    def flush(self) -> None:
        self.raw.flush()
