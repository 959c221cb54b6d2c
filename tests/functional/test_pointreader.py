"""The point reader answers reads and extents of a disk at any point of a chain straight from the set:
plain, lz4 and zstd stream sets and virtnbdbackup sets, against the disk as it was at each point."""
from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from tests.functional.restore_sets import SetBuilder
from tests.functional.test_restore_legacy import _build as build_legacy
from virtnbd import errors
from virtnbd.access import frametable
from virtnbd.access.pointreader import DATA, open_point
from virtnbd.restore.source import ChainFileError
from virtnbd.stream import format as fmt
from virtnbd.stream.detect import open_stream

CLUSTER = 64 << 10


def build_chain(folder: Path, compression: str | None, incs: int = 5) -> SetBuilder:
    """full + ``incs`` incs + a diff, with a shrink and a grow on the way."""
    b = SetBuilder(str(folder), size=4 << 20, cluster=CLUSTER, compression=compression, seed=7)
    b.scribble(40)
    b.full()
    for n in range(incs):
        if n == 2:
            b.resize(3 << 20)
        if n == 3:
            b.resize(5 << 20)
        b.scribble(12)
        b.inc()
    b.scribble(5)
    b.diff()
    return b


def random_ranges(size: int, seed: int, n: int = 20) -> list[tuple[int, int]]:
    """Ranges that start inside one frame and end inside another (crossing frame and point boundaries)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start = rng.randrange(size - 1)
        out.append((start, min(size - start, rng.randrange(1, 3 * CLUSTER))))
    return out


def check_against(reader, want: bytes, seed: int) -> None:
    assert reader.size == len(want)
    assert reader.pread(0, reader.size) == want
    for start, length in random_ranges(reader.size, seed):
        assert reader.pread(start, length) == want[start:start + length], (start, length)
    for start, length, kind in reader.extents(0, reader.size):
        if kind != DATA:
            assert not any(want[start:start + length]), (start, length, kind)
    for start, length in [*random_ranges(reader.size, seed + 1), *whole_frames(reader)]:
        buf = bytearray(b"\xee" * length)                  # readinto fills a dirty buffer (nbdkit's)
        reader.readinto(start, memoryview(buf))
        assert buf == want[start:start + length], (start, length)


def whole_frames(reader, limit: int = 40) -> list[tuple[int, int]]:
    """Ranges of whole data frames visible at the point (read straight into the caller's buffer),
    and pairs of neighbours."""
    out = []
    for seg in reader.segments(0, reader.size):
        table = reader.layers[seg.layer].table if seg.kind == DATA else None
        if table is not None and (seg.start, seg.end) == (table.starts[seg.frame], table.end(seg.frame)):
            out.append((seg.start, seg.end - seg.start))
    pairs = [(a[0], b[0] + b[1] - a[0]) for a, b in itertools.pairwise(out) if a[0] + a[1] == b[0]]
    return (out + pairs)[:limit]


@pytest.mark.parametrize("compression", [None, "lz4", "zstd"])
def test_every_point_reads_as_the_disk_was(tmp_path, compression):
    b = build_chain(tmp_path / "set", compression)
    for n, point in enumerate(b.points):
        with open_point(b.folder, point) as reader:
            check_against(reader, Path(b.shadow_path(point)).read_bytes(), n)


def test_extents_are_thin_and_exact(tmp_path):
    b = SetBuilder(str(tmp_path / "set"), size=4 << 20, cluster=CLUSTER, seed=3)
    b.shadow[CLUSTER:2 * CLUSTER] = b"x" * CLUSTER
    b.allocated.add(1)
    b.allocated.add(3)                       # allocated but zero: a zero frame
    b.full()
    with open_point(b.folder) as reader:
        assert reader.extents(0, reader.size) == [
            (0, CLUSTER, "hole"), (CLUSTER, CLUSTER, "data"), (2 * CLUSTER, CLUSTER, "hole"),
            (3 * CLUSTER, CLUSTER, "zero"), (4 * CLUSTER, reader.size - 4 * CLUSTER, "hole")]


def test_legacy_sets_read_at_every_point(tmp_path):
    for compress in (False, True):
        folder = tmp_path / f"legacy-{compress}"
        expected, names = build_legacy(folder, compress)
        for n, point in enumerate(names):
            for disk, want in expected[point].items():
                with open_point(str(folder), point, disk) as reader:
                    check_against(reader, want, n)


def test_two_disks_need_a_choice(tmp_path):
    folder = tmp_path / "legacy"
    build_legacy(folder, False)
    with pytest.raises(errors.UsageError, match="holds disks sda, sdb"):
        open_point(str(folder))


def first_data_frame(path: str):
    with open_stream(path) as reader:
        return next(ref for ref in reader.frames() if ref.kind == "data")


def damage_first_data_frame(stream: Path, at: int, mask: int = 0xFF):
    """Flip bits of one payload byte of the stream's first data frame; return that frame."""
    ref = first_data_frame(str(stream))
    raw = bytearray(stream.read_bytes())
    raw[ref.pos + fmt.FRAME.size + at] ^= mask
    stream.write_bytes(bytes(raw))
    return ref


@pytest.mark.parametrize("compression", [None, "lz4"])
def test_a_damaged_frame_fails_its_reads_only(tmp_path, compression):
    b = build_chain(tmp_path / "set", compression, incs=2)
    point = b.points[1]
    stream = Path(b.folder) / f"sda.inc.{point}.data"
    ref = damage_first_data_frame(stream, 100)
    want = Path(b.shadow_path(b.points[-1])).read_bytes()
    with open_point(b.folder) as reader:
        hit = [s for s in reader.segments(ref.offset, ref.length) if s.kind == DATA
               and reader.layers[s.layer].file.point == point]
        assert hit, "the damaged frame must still be visible at the newest point for this test"
        with pytest.raises(ChainFileError, match=f"point {point}.*checksum mismatch|point {point}.*corrupt"):
            reader.pread(hit[0].start, 1)
        with pytest.raises(ChainFileError, match=f"point {point}.*checksum mismatch|point {point}.*corrupt"):
            reader.readinto(hit[0].start, memoryview(bytearray(hit[0].end - hit[0].start)))
        elsewhere = [s for s in reader.segments(0, reader.size) if s.end <= ref.offset or s.start >= ref.offset
                     + ref.length]
        for seg in elsewhere:
            assert reader.pread(seg.start, seg.end - seg.start) == want[seg.start:seg.end]


def test_a_damaged_index_is_refused(tmp_path):
    b = SetBuilder(str(tmp_path / "set"), size=1 << 20, cluster=CLUSTER, seed=5)
    b.scribble(4)
    b.full()
    with open_stream(str(Path(b.folder) / "sda.full.data")) as reader:
        entries, index_pos, _ = reader.index_entries()
        swapped = entries[32:64] + entries[:32] + entries[64:]
        with pytest.raises(errors.FormatError, match="invalid index entry"):
            frametable.from_index(reader.path, swapped, reader.meta.virtual_size, index_pos)


def test_the_preferred_request_is_a_frame(tmp_path):
    b = SetBuilder(str(tmp_path / "set"), size=4 << 20, cluster=CLUSTER, seed=5)
    b.scribble(6)
    b.full()
    with open_point(b.folder) as reader:
        longest, preferred = reader.layers[0].table.longest_data(), reader.preferred_block_size()
        assert longest > 0 and preferred & (preferred - 1) == 0           # a power of two
        assert max(longest, 4096) <= preferred < max(2 * longest, 4096 + 1)


def test_reads_outside_the_disk_are_refused(tmp_path):
    b = SetBuilder(str(tmp_path / "set"), size=1 << 20, cluster=CLUSTER, seed=5)
    b.full()
    with open_point(b.folder) as reader, pytest.raises(errors.UsageError, match="outside the disk"):
        reader.pread(reader.size - 10, 11)


def test_a_raw_disk_image_saved_by_virtnbdbackup(tmp_path):
    """virtnbdbackup saves a raw-format disk as a plain image (``sda.copy.data``): readable at random too."""
    folder = tmp_path / "rawcopy"
    folder.mkdir()
    want = random.Random(9).randbytes(1 << 20) + bytes(1 << 20)
    (folder / "sda.copy.data").write_bytes(want)
    (folder / "vmconfig.copy.xml").write_text("<domain><name>vm</name><uuid>1-2</uuid></domain>")
    with open_point(str(folder)) as reader:
        check_against(reader, want, 4)
