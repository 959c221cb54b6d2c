"""Pure logic of the test lab: deterministic ops, range arithmetic, mismatch reports."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab.common import MiB
from tests.lab.diskops import ALIGN, Op, qemu_io_command, random_writes, ranges_cover, ranges_of
from tests.lab.images import ImageMismatch, assert_bytes_equal, describe_bytes_mismatch
from tests.lab.nbd_lab import nonzero_segments, write_expected


def test_random_writes_deterministic_aligned_inside() -> None:
    ops = random_writes(seed=5, n=200, size=8 * MiB)
    assert ops == random_writes(seed=5, n=200, size=8 * MiB)
    assert ops != random_writes(seed=6, n=200, size=8 * MiB)
    assert {op.kind for op in ops} == {"data", "pattern", "zero", "discard"}
    for op in ops:
        assert op.offset % ALIGN == 0 and op.length % ALIGN == 0
        assert 0 <= op.offset < op.end <= 8 * MiB
    only = random_writes(seed=5, n=50, size=8 * MiB, kinds=("zero",))
    assert {op.kind for op in only} == {"zero"}


def test_op_data() -> None:
    assert Op("pattern", 0, 4, pattern=0xAB).data() == b"\xab" * 4
    assert Op("zero", 0, 3).data() == Op("discard", 0, 3).data() == bytes(3)
    d = Op("data", 0, 64, seed=1).data()
    assert d == Op("data", 100, 64, seed=1).data() != Op("data", 0, 64, seed=2).data()
    assert len(d) == 64


def test_qemu_io_commands() -> None:
    assert qemu_io_command(Op("pattern", 65536, 512, pattern=0x5A), None) == "write -P 0x5a 65536 512"
    assert qemu_io_command(Op("zero", 0, 512), None) == "write -z 0 512"
    assert qemu_io_command(Op("discard", 0, 512), None) == "discard 0 512"
    assert qemu_io_command(Op("data", 0, 512, seed=1), Path("/x/d.bin")) == "write -s /x/d.bin 0 512"
    with pytest.raises(ValueError, match="kind"):
        qemu_io_command(Op("trim", 0, 1), None)


def test_ranges_of_merges_overlaps_and_neighbours() -> None:
    ops = [Op("zero", 10, 5), Op("zero", 0, 5), Op("zero", 5, 2), Op("zero", 12, 10), Op("zero", 30, 1)]
    assert ranges_of(ops) == [(0, 7), (10, 12), (30, 1)]


def test_ranges_cover() -> None:
    outer = [(0, 10), (10, 5), (20, 5)]
    assert ranges_cover(outer, [(0, 15), (21, 2)])
    assert not ranges_cover(outer, [(14, 2)])
    assert not ranges_cover([], [(0, 1)])
    assert ranges_cover([], [])


def test_mismatch_report_names_blocks_and_first_byte() -> None:
    want = bytes(4 * ALIGN)
    got = bytearray(want)
    got[ALIGN + 7] = 0x42
    msg = describe_bytes_mismatch(bytes(got), want)
    assert "1 of 4 blocks" in msg and "0x10000" in msg and "0x10007" in msg and "0x42" in msg
    with pytest.raises(ImageMismatch, match="disk sda"):
        assert_bytes_equal(bytes(got), want, "disk sda")
    assert_bytes_equal(want, want)
    assert "length" in describe_bytes_mismatch(b"ab", b"abc")


def test_expected_file_and_segments(tmp_path: Path) -> None:
    ops = [
        Op("pattern", ALIGN, ALIGN, pattern=1),
        Op("data", 3 * ALIGN, 2 * ALIGN, seed=9),
        Op("zero", 4 * ALIGN, ALIGN),
    ]
    path = tmp_path / "e.raw"
    write_expected(path, 8 * ALIGN, ops)
    data = path.read_bytes()
    assert len(data) == 8 * ALIGN
    assert data[ALIGN : 2 * ALIGN] == b"\x01" * ALIGN
    assert data[3 * ALIGN : 4 * ALIGN] == Op("data", 0, 2 * ALIGN, seed=9).data()[:ALIGN]
    assert data[4 * ALIGN : 5 * ALIGN] == bytes(ALIGN)
    assert nonzero_segments(data) == [(ALIGN, ALIGN), (3 * ALIGN, ALIGN)]
