"""allocator.keep_frame_buffers: frame-sized blocks come from the heap, not from fresh mmaps.

(A freshly mmap'ed block is faulted in page by page each time; the measured
effect on a backup is in docs/devnotes/backup.md.)"""
from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from virtnbd import allocator
tuned = sys.argv[1] == "tuned"
if tuned:
    assert allocator.keep_frame_buffers()
import ctypes
block = bytearray(3 << 20)      # about three compressed 1 MiB frames' worth
address = ctypes.addressof(ctypes.c_char.from_buffer(block))
with open("/proc/self/maps") as f:
    for line in f:
        span, *rest = line.split()
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= address < hi:
            print("heap" if rest[-1] == "[heap]" else "mmap")
"""


def placed(mode: str) -> str:
    """Where a 3 MiB block lands in a fresh process: "heap" (brk) or "mmap"."""
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def test_untuned_glibc_maps_each_big_block():
    # the premise: glibc's default serves a 3 MiB block with its own mmap
    assert placed("plain") == "mmap"


def test_tuned_block_comes_from_the_heap():
    assert placed("tuned") == "heap"


def test_can_be_called_again():
    from virtnbd import allocator
    assert allocator.keep_frame_buffers() is True
    assert allocator.keep_frame_buffers() is True


def test_uninitialized_is_a_writable_bytearray_of_that_size():
    import pytest

    from virtnbd import allocator
    for size in (0, 1, 4096, (1 << 20) + 16):
        buf = allocator.uninitialized(size)
        assert type(buf) is bytearray and len(buf) == size
        buf[:] = b"\x5a" * size
        assert buf == b"\x5a" * size
    with pytest.raises(ValueError):
        allocator.uninitialized(-1)
