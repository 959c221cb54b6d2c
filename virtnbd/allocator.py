"""Keep the C allocator from handing frame-sized buffers back to the kernel.

Every compressed frame is a fresh ``bytes`` of a few hundred KiB, made in an
encode thread and freed in the copy loop. With glibc's defaults such blocks
are mmap'ed or trimmed off the heap when freed, and the next one is faulted
in again page by page: ~60 000 page faults and ~0.1 s of CPU per 1.5 GiB of
compressed backup (measured, docs/devnotes/backup.md). Fixed thresholds keep
them on the heap for reuse. Memory is still bounded by the frames in flight.

:func:`uninitialized` makes a ``bytearray`` without zeroing it first (``bytearray(n)``
writes n zero bytes; a buffer that a read fills at once does not need them).
"""
from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1       # glibc <malloc.h>
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 4 << 20    # above the largest frame (1 MiB) and its lz4/zstd bound
TRIM_THRESHOLD = 8 << 20    # free memory one heap keeps before giving it back


def keep_frame_buffers() -> bool:
    """Set glibc's thresholds for this process; False where there is no ``mallopt``."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        log.debug("no mallopt in this C library: allocator left alone")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not done:
        log.debug("mallopt refused the thresholds: allocator left alone")
    return done


def _bytearray_maker() -> Callable[[int], bytearray]:
    """CPython's ``PyByteArray_FromStringAndSize(NULL, n)``: a bytearray of n bytes, not zeroed."""
    try:
        make = ctypes.pythonapi.PyByteArray_FromStringAndSize
    except AttributeError:           # not CPython: zeroed, as bytearray() always is
        return bytearray
    make.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    make.restype = ctypes.py_object
    return lambda size: make(None, size)  # type: ignore[no-any-return]


_make_bytearray = _bytearray_maker()


def uninitialized(size: int) -> bytearray:
    """A new ``bytearray`` of ``size`` bytes whose contents are undefined (whatever the heap held:
    fill it completely, e.g. by a read, before anything reads it or lets it out). Saves the memset
    of ``bytearray(size)``: ~30 us per MiB, 2-3 % of an encrypted restore's CPU."""
    if size < 0:
        raise ValueError(f"negative buffer size {size}")
    return _make_bytearray(size)
