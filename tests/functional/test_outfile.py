"""StagedFile: what it writes is exactly what it was given, in both modes, with the digest of the file."""
from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest
import xxhash

from virtnbd import errors
from virtnbd.backupset.outfile import ALIGN, BLOCK, WRITEBACK_LAG, StagedFile, WriteMode


def _pieces(rng: random.Random, total: int) -> list[bytes]:
    out, size = [], 0
    while size < total:
        n = rng.choice([1, 47, 48, ALIGN - 1, ALIGN, 65536, 1 << 20, (1 << 20) + 48, 3 << 20])
        out.append(rng.randbytes(n))
        size += n
    return out


@pytest.mark.parametrize("direct", [True, False, None])
@pytest.mark.parametrize("seed", [1, 2])
def test_bytes_and_digest_match_with_flushes_in_between(tmp_path: Path, direct: bool, seed: int) -> None:
    rng = random.Random(seed)
    pieces = _pieces(rng, 40 << 20)
    path = tmp_path / "out.partial"
    path.touch()
    expected = bytearray()
    with StagedFile(str(path), direct=direct, block=1 << 20, blocks=3) as out:
        for i, piece in enumerate(pieces):
            assert out.write(memoryview(piece)) == len(piece)
            expected += piece
            if i % 7 == 3:           # a flush in the middle: padded tail, cut, then filled on
                out.flush()
                assert path.stat().st_size == len(expected)
        out.flush()
        digest = out.hexdigest()
    assert out.pos == len(expected)
    assert path.read_bytes() == bytes(expected)
    assert digest == xxhash.xxh3_128_hexdigest(bytes(expected))


def test_empty_file_and_tiny_tail(tmp_path: Path) -> None:
    path = tmp_path / "tiny"
    path.touch()
    with StagedFile(str(path)) as out:
        out.flush()
        assert path.stat().st_size == 0
        out.write(b"x" * 5)
        out.flush()
    assert path.read_bytes() == b"xxxxx"


def test_write_error_is_a_storage_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gone"
    path.touch()
    out = StagedFile(str(path), direct=False, block=ALIGN, blocks=2)
    os.close(out.fd)                          # every write now fails with EBADF
    out.fd = os.open(os.devnull, os.O_RDONLY)
    with pytest.raises(errors.StorageError, match="gone"):
        for _ in range(8):
            out.write(b"y" * ALIGN)
        out.flush()
    out.close()


def test_block_size_must_be_aligned(tmp_path: Path) -> None:
    with pytest.raises(errors.UsageError):
        StagedFile(str(tmp_path / "x"), block=ALIGN + 1)


def test_o_direct_refused_at_the_first_write_falls_back_to_the_page_cache(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Some filesystems open with O_DIRECT but fail its writes with EINVAL: the file is still written whole."""
    from virtnbd.backupset import outfile

    real_pwrite = os.pwrite
    refused = []

    def pwrite(fd: int, data: memoryview, pos: int) -> int:
        if fcntl_flags(fd) & os.O_DIRECT:
            refused.append(pos)
            raise OSError(22, "Invalid argument")
        return real_pwrite(fd, data, pos)

    monkeypatch.setattr(outfile.os, "pwrite", pwrite)
    path = tmp_path / "f"
    path.touch()
    data = random.Random(3).randbytes(5 * ALIGN + 17)
    with StagedFile(str(path), block=2 * ALIGN, blocks=2) as out:
        out.write(data)
        out.flush()
        assert not out.direct
    assert refused == [0]
    assert path.read_bytes() == data


def fcntl_flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def _resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache (util-linux fincore)."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         check=True, capture_output=True, text=True)
    return int(out.stdout.split()[0])


@pytest.mark.parametrize("direct", [True, False])
def test_backup_data_does_not_stay_in_the_page_cache(tmp_path: Path, direct: bool) -> None:
    chunk = os.urandom(1 << 20)
    cached = tmp_path / "plain"
    cached.write_bytes(chunk * 96)
    assert _resident(cached) >= 90 << 20          # the premise: a plain write stays cached
    path = tmp_path / "out.partial"
    path.touch()
    with StagedFile(str(path), direct=direct) as out:
        for _ in range(96):
            out.write(chunk)
        out.flush()
        resident = _resident(path)
        assert out.direct is direct                # this filesystem takes O_DIRECT
    assert resident <= (0 if direct else WRITEBACK_LAG + 2 * BLOCK)
    assert path.read_bytes() == chunk * 96


class _Alternating:
    """A write mode that flips every block: O_DIRECT and page-cache writes side by side in one file."""

    def __init__(self) -> None:
        self.direct = self.adaptive = True
        self.switches = 0
        self.calls = 0

    def choose(self, queued: int, blocks: int) -> bool:
        self.calls += 1
        return self.calls % 2 == 1


def test_blocks_written_both_ways_make_one_exact_file(tmp_path: Path) -> None:
    data = random.Random(5).randbytes((24 << 20) + 12345)
    path = tmp_path / "mixed"
    path.touch()
    with StagedFile(str(path), block=1 << 20, blocks=3) as out:
        out.mode = _Alternating()      # type: ignore[assignment]
        for start in range(0, len(data), 300_000):
            out.write(data[start:start + 300_000])
        out.flush()
        digest = out.hexdigest()
        assert out.mode.calls > 20
    assert path.read_bytes() == data
    assert digest == xxhash.xxh3_128_hexdigest(data)


def test_write_mode_keeps_o_direct_while_the_writer_keeps_up() -> None:
    mode = WriteMode(True, patience=4)
    for queued in [0, 1, 2, 3, 3, 3, 0, 3, 3, 3, 1] * 10:    # never 4 blocks behind in a row
        assert mode.choose(queued, 4) is True
    assert mode.switches == 0


def test_write_mode_goes_to_the_page_cache_for_good_when_the_disk_is_behind() -> None:
    mode = WriteMode(True, patience=4)
    assert [mode.choose(3, 4) for _ in range(4)] == [True, True, True, False]
    assert [mode.choose(0, 4) for _ in range(20)] == [False] * 20     # one way
    assert mode.switches == 1


def test_write_mode_not_adaptive_holds_its_mode() -> None:
    assert all(WriteMode(True, adaptive=False).choose(3, 4) for _ in range(20))
    cached = WriteMode(False)
    assert not any(cached.choose(0, 4) for _ in range(20)) and cached.switches == 0
