"""RegionHasher (integrity records computed while writing) gives exactly the record of hashing the
finished file: in-order writes, holes, writes behind the hashed end, a file cut short or grown."""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from virtnbd.backupset.qcow2integrity import RegionHasher, image_integrity

REGION = 1 << 20


def _write(path: Path, hasher: RegionHasher, writes: list[tuple[int, bytes]], size: int | None = None) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for pos, data in writes:
            os.pwrite(fd, data, pos)
            hasher.written(pos, data)
        if size is not None:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _check(path: Path, hasher: RegionHasher) -> None:
    assert hasher.finish(str(path)) == image_integrity(str(path), REGION)


def test_in_order_with_holes_and_header_last(tmp_path: Path) -> None:
    rng = random.Random(5)
    writes, pos = [], 65536
    for _ in range(60):
        pos += rng.choice([0, 0, 4096, 65536 - 4096, 3 * REGION])
        data = rng.randbytes(rng.choice([4096, 65536, REGION, REGION + 12345]))
        writes.append((pos, data))
        pos += len(data)
    writes.append((0, b"QFI\xfb" + bytes(100)))            # the header, written last
    path = tmp_path / "img"
    _write(path, hasher := RegionHasher(REGION), writes)
    _check(path, hasher)


@pytest.mark.parametrize("size", [0, 100, REGION, 5 * REGION + 7, 9 * REGION])
def test_file_size_set_after_the_writes(tmp_path: Path, size: int) -> None:
    path = tmp_path / "img"
    hasher = RegionHasher(REGION)
    _write(path, hasher, [(10, b"x" * (3 * REGION)), (4 * REGION - 3, b"tail" * 99)], size=size)
    _check(path, hasher)


def test_writes_in_any_order(tmp_path: Path) -> None:
    rng = random.Random(9)
    writes = [(rng.randrange(0, 6 * REGION), rng.randbytes(rng.randrange(1, 2 * REGION))) for _ in range(30)]
    path = tmp_path / "img"
    _write(path, hasher := RegionHasher(REGION), writes)
    _check(path, hasher)


def test_nothing_written(tmp_path: Path) -> None:
    path = tmp_path / "img"
    _write(path, hasher := RegionHasher(REGION), [], size=3 * REGION)
    _check(path, hasher)
