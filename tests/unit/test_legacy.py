"""virtnbdbackup sets: sparse stream reader (virtnbd.stream.legacy) and chain loader (virtnbd.backupset.legacy).

Fixtures come from tests/lab/legacy_writer.py, an independent writer that
follows docs/LEGACY_FORMAT.md.
"""
from __future__ import annotations

import io
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab.legacy_writer import LegacyPoint, stream_bytes, write_set, write_stream
from tests.unit.stream_helpers import image_of
from virtnbd import errors
from virtnbd.backupset import chain
from virtnbd.backupset import legacy as legacy_set
from virtnbd.stream import legacy as legacy_stream
from virtnbd.stream import open_stream
from virtnbd.stream.legacy import LegacyStreamReader, open_raw_image

KiB = 1024
SIZE = 256 * KiB
UUID = "0a7c6f0e-5b8e-4b5a-9d62-3c1c7e0f1a2b"


def extents(seed: int) -> list[tuple[str, int, object]]:
    rng = random.Random(seed)
    return [("data", 0, rng.randbytes(3000)), ("zero", 3000, 5192), ("data", 8 * KiB, b"x" * 40 * KiB),
            ("data", 64 * KiB, rng.randbytes(20 * KiB)), ("zero", 128 * KiB, 128 * KiB)]


VARIANTS = [  # (stream version, compressed, max request size: small => chunked compressed entries)
    (1, False, 32 << 20), (2, False, 32 << 20), (2, True, 32 << 20), (2, True, 8 * KiB)]


@pytest.mark.parametrize(("version", "compress", "max_request"), VARIANTS)
def test_stream_round_trip(tmp_path: Path, version: int, compress: bool, max_request: int,
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(legacy_stream, "SPLIT", 16 * KiB)     # big uncompressed frames are served in pieces
    ext = extents(version)
    path = tmp_path / "sda.inc.virtnbdbackup.1.data"
    write_stream(path, stream_bytes(ext, virtual_size=SIZE, checkpoint="virtnbdbackup.1", parent="virtnbdbackup.0",
                                    incremental=True, version=version, compress=compress, max_request=max_request))
    with open_stream(path) as r:
        assert isinstance(r, LegacyStreamReader)
        assert (r.meta.level, r.meta.checkpoint, r.meta.parent, r.meta.virtual_size, r.meta.disk) == \
            ("inc", "virtnbdbackup.1", "virtnbdbackup.0", SIZE, "sda")
        assert r.meta.compression == ("lz4" if compress else None)
        refs = r.frames()
        assert [(f.kind, f.offset) for f in refs if f.kind == "zero"] == [(k, o) for k, o, _ in ext if k == "zero"]
        assert max(f.length for f in refs if f.kind == "data") <= (max_request if compress else 16 * KiB)
        assert all(a.offset + a.length <= b.offset for a, b in zip(refs, refs[1:], strict=False))
        image = bytearray(SIZE)
        for ref, data in r.iter_frames():
            assert (data is None) == (ref.kind == "zero")
            if data is not None:
                image[ref.offset:ref.offset + ref.length] = data
        assert image == image_of(ext, SIZE)
        assert r.read_range(0, SIZE) == image_of(ext, SIZE)
        totals = r.verify()
        assert totals.data_bytes == 3000 + 60 * KiB and totals.stored_bytes == path.stat().st_size
        assert totals.digest.startswith("adler32:")
        assert r.read_range(8 * KiB - 10, 20) == bytes(10) + b"x" * 10


def test_not_seekable_is_refused() -> None:
    data = stream_bytes(extents(1), virtual_size=SIZE)
    with pytest.raises(errors.UsageError):
        LegacyStreamReader(_NoSeek(data), "<pipe>")


class _NoSeek(io.BytesIO):
    def seekable(self) -> bool:
        return False


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder on tmpfs when there is one: thousands of rewrites stay fast."""
    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="vnbd-legacy-", dir="/dev/shm"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize(("version", "compress", "max_request"), VARIANTS)
def test_every_truncation_and_flip_detected_with_chksum(fast_dir: Path, version: int, compress: bool,
                                                        max_request: int) -> None:
    ext = [("data", 0, random.Random(3).randbytes(300)), ("zero", 300, 700), ("data", 4096, b"ab" * 700)]
    blob = stream_bytes(ext, virtual_size=8 * KiB, version=version, compress=compress, max_request=max_request)
    path = fast_dir / "sda.full.data"
    want = {o: v for k, o, v in ext if k == "data"}
    write_stream(path, blob)                    # .chksum of the intact stream
    fd = os.open(path, os.O_WRONLY)             # rewritten in place: fast on any file system

    def check(data: bytes) -> None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        try:
            with open_stream(path) as r:
                for ref in r.frames():                       # never wrong data on the random-access path
                    got = r.read(ref)
                    assert ref.kind == "zero" or got == want[ref.offset]
                r.verify()
        except errors.FormatError as err:
            assert err.path == str(path) and 0 <= err.offset <= len(data)
            return
        pytest.fail(f"damage not detected ({len(data)} bytes)")

    for cut in range(len(blob)):
        check(blob[:cut])
    rng = random.Random(version * 10 + compress)
    for pos in rng.sample(range(len(blob)), min(300, len(blob))):
        bad = bytearray(blob)
        bad[pos] ^= rng.randrange(1, 256)
        check(bytes(bad))
    os.close(fd)


def make_set(folder: Path) -> None:
    write_set(folder, "vm1", UUID, [
        LegacyPoint("full", {"sda": [("data", 0, b"F" * 8 * KiB), ("zero", 8 * KiB, SIZE - 8 * KiB)],
                             "sdb": [("data", 0, b"f" * 4 * KiB), ("zero", 4 * KiB, SIZE - 4 * KiB)]}),
        LegacyPoint("inc", {"sda": [("data", 4 * KiB, b"I" * 4 * KiB)], "sdb": []}, compress=True),
        LegacyPoint("diff", {"sda": [("data", 0, b"D" * KiB)], "sdb": []}, ident="1700000100"),
        LegacyPoint("diff", {"sda": [("data", 0, b"E" * KiB)], "sdb": []}, ident="1700000050"),
        LegacyPoint("inc", {"sda": [("data", 16 * KiB, b"J" * KiB)], "sdb": [("data", 0, b"j" * KiB)]},
                    version=1),
    ], virtual_size=SIZE)


def test_legacy_set_chain_from_metadata_not_file_times(tmp_path: Path) -> None:
    make_set(tmp_path)
    for i, p in enumerate(sorted(tmp_path.glob("*.data"), reverse=True)):   # scramble file times
        os.utime(p, (1000 + i, 1000 + i))
    m = legacy_set.load(tmp_path)
    assert m is not None and m.domain == "vm1" and m.domain_uuid == UUID
    assert [p.name for p in m.points] == ["virtnbdbackup.0", "virtnbdbackup.1", "diff.1700000050",
                                          "diff.1700000100", "virtnbdbackup.2"]
    assert [p.parent for p in m.points] == [None, "virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.1",
                                            "virtnbdbackup.1"]
    assert set(m.points[0].disks) == {"sda", "sdb"}
    assert m.points[0].disks["sda"].file == "sda.full.data"
    assert m.points[0].checkpoint_xml and "virtnbdbackup.0" in m.points[0].checkpoint_xml
    assert m.points[0].domain_xml and UUID in m.points[0].domain_xml
    names = lambda pts: [p.name for p in pts]  # noqa: E731
    assert names(chain.resolve(m, None)) == ["virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2"]
    assert names(chain.resolve(m, "diff.1700000100")) == ["virtnbdbackup.0", "virtnbdbackup.1", "diff.1700000100"]
    with pytest.raises(errors.ChainError, match="available"):
        chain.resolve(m, "virtnbdbackup.7")


def test_legacy_set_restores_bytes(tmp_path: Path) -> None:
    make_set(tmp_path)
    m = legacy_set.load(tmp_path)
    assert m is not None
    image = bytearray(SIZE)
    for point in chain.resolve(m, "diff.1700000100"):
        with open_stream(tmp_path / point.disks["sda"].file) as r:
            for ref, data in r.iter_frames():
                image[ref.offset:ref.offset + ref.length] = data if data is not None else bytes(ref.length)
    want = bytearray(SIZE)
    want[0:8 * KiB] = b"F" * 8 * KiB
    want[4 * KiB:8 * KiB] = b"I" * 4 * KiB
    want[0:KiB] = b"D" * KiB
    assert image == want


def test_legacy_set_missing_inc_breaks_chain(tmp_path: Path) -> None:
    make_set(tmp_path)
    (tmp_path / "sda.inc.virtnbdbackup.1.data").unlink()
    (tmp_path / "sdb.inc.virtnbdbackup.1.data").unlink()
    m = legacy_set.load(tmp_path)
    assert m is not None
    with pytest.raises(errors.ChainError, match="parent virtnbdbackup.1 is not in the backup set"):
        chain.resolve(m, None)
    assert [p.name for p in chain.resolve(m, "virtnbdbackup.0")] == ["virtnbdbackup.0"]


def test_legacy_set_none_for_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    assert legacy_set.load(tmp_path) is None


def test_raw_image_of_a_raw_disk(tmp_path: Path) -> None:
    """virtnbdbackup saves raw-format disks as plain images named <dev>.copy.data."""
    image = random.Random(5).randbytes(9 * KiB)
    (tmp_path / "sdc.copy.data").write_bytes(image)
    (tmp_path / "vmconfig.copy.xml").write_text(f"<domain><name>vm1</name><uuid>{UUID}</uuid></domain>")
    m = legacy_set.load(tmp_path)
    assert m is not None and [p.name for p in m.points] == ["copy"]
    entry = m.points[0].disks["sdc"]
    assert entry.extra["raw_image"] and entry.virtual_size == len(image) and entry.disk_format == "raw"
    with pytest.raises(errors.FormatError):
        open_stream(tmp_path / "sdc.copy.data")            # never mistaken for a stream
    with open_raw_image(tmp_path / "sdc.copy.data") as r:
        assert r.read_range(0, len(image)) == image
        assert b"".join(d for _, d in r.iter_frames() if d is not None) == image
        assert r.verify().data_bytes == len(image)
