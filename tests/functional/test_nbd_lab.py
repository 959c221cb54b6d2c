"""The NBD lab servers serve exactly the bytes (and extents) they promise."""
from __future__ import annotations

import hashlib

import pytest

from tests.lab.libvirt_lab import ALIGN, MiB, data_op, pattern_op, random_writes, ranges_of, zero_op
from tests.lab.nbd_lab import flagged_ranges, nbdkit_command, nonzero_segments, read_all

SIZE = 8 * MiB


def test_memory_is_writable_and_starts_zero(nbdkit_memory) -> None:  # type: ignore[no-untyped-def]
    srv = nbdkit_memory(SIZE)
    h = srv.connect()
    try:
        assert read_all(h, SIZE) == srv.expected_bytes() == bytes(SIZE)
        h.pwrite(b"\xab" * ALIGN, 3 * ALIGN)
        assert h.pread(ALIGN, 3 * ALIGN) == b"\xab" * ALIGN
    finally:
        h.shutdown()


def test_data_serves_ops_and_holes(nbdkit_data) -> None:  # type: ignore[no-untyped-def]
    ops = [data_op(0, 2 * ALIGN, 5), pattern_op(MiB, ALIGN, 0x42), data_op(5 * MiB, ALIGN, 6), zero_op(0, 100)]
    srv = nbdkit_data(SIZE, ops)
    expected = bytearray(SIZE)
    for op in ops:
        expected[op.offset : op.end] = op.data()
    assert srv.expected_bytes() == bytes(expected)
    h = srv.connect(["base:allocation"])
    try:
        got = read_all(h, SIZE)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(expected).hexdigest()
        holes = flagged_ranges(h, SIZE, "base:allocation", 1)
    finally:
        h.shutdown()
    # everything outside the written segments is a hole
    data = nonzero_segments(bytes(expected))
    assert data == [(0, 2 * ALIGN), (MiB, ALIGN), (5 * MiB, ALIGN)]
    assert sum(n for _, n in holes) == SIZE - sum(n for _, n in data)


def test_sparse_random_is_deterministic(nbdkit_sparse_random) -> None:  # type: ignore[no-untyped-def]
    a = nbdkit_sparse_random(SIZE, seed=7, percent=20)
    b = nbdkit_sparse_random(SIZE, seed=7, percent=20)
    c = nbdkit_sparse_random(SIZE, seed=8, percent=20)
    h = a.connect(["base:allocation"])
    try:
        got = read_all(h, SIZE)
        holes = flagged_ranges(h, SIZE, "base:allocation", 1)
    finally:
        h.shutdown()
    assert got == a.expected_bytes() == b.expected_bytes()
    assert got != c.expected_bytes()
    assert 0 < sum(n for _, n in holes) < SIZE
    assert any(got)


def test_qemu_nbd_bitmap_reports_dirty_ranges(qemu_nbd_bitmap) -> None:  # type: ignore[no-untyped-def]
    base = random_writes(seed=3, n=10, size=SIZE)
    dirty = [data_op(2 * MiB, 3 * ALIGN, 11), pattern_op(6 * MiB, ALIGN, 0x77), zero_op(7 * MiB, 2 * ALIGN)]
    srv = qemu_nbd_bitmap(SIZE, base, dirty)
    assert srv.dirty == ranges_of(dirty)
    h = srv.connect(["base:allocation", srv.dirty_context])
    try:
        assert h.can_meta_context(srv.dirty_context)
        assert flagged_ranges(h, SIZE, srv.dirty_context, 1) == srv.dirty
        assert read_all(h, SIZE) == srv.expected_bytes()
        assert h.can_multi_conn()
    finally:
        h.shutdown()


def test_connect_command_private_server() -> None:
    nbd = pytest.importorskip("nbd")
    h = nbd.NBD()
    h.connect_command(nbdkit_command("pattern", f"size={SIZE}"))
    try:
        # the pattern plugin: each 8-byte word holds its own big-endian offset
        assert h.pread(8, 1024) == (1024).to_bytes(8, "big")
    finally:
        h.shutdown()
