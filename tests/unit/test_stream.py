"""Round trips through StreamWriter / open_stream (virtnbd.stream)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from tests.unit.stream_helpers import meta
from tests.unit.stream_helpers import write_layout as write
from virtnbd import errors, fsutil
from virtnbd.stream import FrameRef, StreamWriter, encode_data, open_stream
from virtnbd.stream.format import FRAME, EncodedFrame

MiB = 1 << 20


def sample_layout() -> list[tuple[str, int, bytes | int]]:
    rnd = os.urandom(70000)
    return [("data", 0, rnd), ("zero", 70000, 1 * MiB), ("data", 2 * MiB, b"ab" * 40000),
            ("zero", 3 * MiB, 5 * MiB)]


@pytest.mark.parametrize("method", [None, "lz4", "zstd"])
def test_round_trip_random_access_and_sequential(tmp_path: Path, method: str | None) -> None:
    layout = sample_layout()
    path = tmp_path / "sda.full.data"
    with fsutil.partial_file(path) as f:
        totals = write(f, meta(method), layout, str(path))
    assert totals.stored_bytes == path.stat().st_size
    assert totals.data_bytes == 150000 and totals.zero_bytes == 6 * MiB and totals.frames == 4
    with open_stream(path) as r:
        assert r.meta == meta(method)
        refs = r.frames()
        assert [(x.kind, x.offset) for x in refs] == [(k, o) for k, o, _ in layout]
        assert r.read(refs[0]) == layout[0][2]
        assert r.read(refs[2]) == layout[2][2]
        assert r.read(refs[1]) == bytes(MiB)
        seq = [(ref, data) for ref, data in r.iter_frames()]
        assert seq[0][1] == layout[0][2] and seq[1][1] is None and seq[2][1] == layout[2][2]
        assert r.verify() == totals
        assert r.read_range(69990, 20) == layout[0][2][69990:] + bytes(10)
        assert r.read_range(2 * MiB + 1, 3) == b"bab"


def test_compression_shrinks_compressible_data_and_skips_incompressible() -> None:
    plain = encode_data(0, b"a" * 65536, "zstd")
    assert len(plain.payload) < 1000
    rnd = encode_data(0, os.urandom(65536), "lz4")
    assert len(rnd.payload) == 65536   # stored uncompressed when compression does not help


def test_iter_frames_from_a_pipe() -> None:
    layout = sample_layout()
    buf = io.BytesIO()
    totals = write(buf, meta("lz4"), layout)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: feed the pipe
        os.close(rfd)
        with os.fdopen(wfd, "wb") as w:
            w.write(buf.getvalue())
        os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as pipe:
        reader = open_stream(pipe, path="<pipe>")
        got = [(ref.kind, ref.offset, data) for ref, data in reader.iter_frames()]
        assert reader.totals == totals
        with pytest.raises(errors.UsageError):
            reader.frames()
    os.waitpid(pid, 0)
    assert got == [(k, o, v if k == "data" else None) for k, o, v in layout]


def test_writer_rejects_overlap_and_out_of_order() -> None:
    w = StreamWriter(io.BytesIO(), meta())
    w.write_data(4096, b"x" * 4096)
    with pytest.raises(errors.FormatError, match="overlaps"):
        w.write_zero(4096 + 100, 10)
    with pytest.raises(errors.FormatError, match="overlaps"):
        w.write_data(0, b"y")
    with pytest.raises(errors.FormatError, match="beyond virtual size"):
        w.write_zero(8192, 8 * MiB)


def test_unfinished_stream_is_rejected() -> None:
    buf = io.BytesIO()
    w = StreamWriter(buf, meta())
    w.write_data(0, b"x" * 100)
    buf.seek(0)
    r = open_stream(buf, path="<mem>")
    with pytest.raises(errors.FormatError) as exc:
        r.verify()
    assert exc.value.path == "<mem>"
    with pytest.raises(errors.FormatError):
        r.frames()


def test_not_a_stream(tmp_path: Path) -> None:
    p = tmp_path / "junk"
    p.write_bytes(b"hello world" * 10)
    with pytest.raises(errors.FormatError, match="not a virtnbd"):
        open_stream(p)


def test_empty_stream_round_trips() -> None:
    buf = io.BytesIO()
    totals = write(buf, meta(size=0), [])
    buf.seek(0)
    r = open_stream(buf)
    assert r.frames() == [] and r.verify() == totals


def test_frame_ref_mismatch_is_a_format_error() -> None:
    buf = io.BytesIO()
    write(buf, meta(), sample_layout())
    buf.seek(0)
    r = open_stream(buf, path="<mem>")
    ref = r.frames()[0]
    with pytest.raises(errors.FormatError, match="does not match the index"):
        r.read(FrameRef("data", ref.offset + 1, ref.length, ref.pos))


class _ShortWrites(io.RawIOBase):
    """A raw file that accepts at most 1000 bytes per write call."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[no-untyped-def,override]
        chunk = bytes(memoryview(b)[:1000])
        self.data += chunk
        return len(chunk)


def test_writer_completes_short_writes_of_raw_files() -> None:
    raw = _ShortWrites()
    layout = sample_layout()
    totals = write(raw, meta(), layout)
    r = open_stream(io.BytesIO(bytes(raw.data)), path="<mem>")
    assert r.verify() == totals and r.read(r.frames()[0]) == layout[0][2]


def test_read_range_outside_the_disk_is_refused() -> None:
    buf = io.BytesIO()
    write(buf, meta(size=MiB), [("data", 0, b"x" * 10)])
    r = open_stream(buf, path="<mem>")
    assert r.read_range(MiB - 5, 5) == bytes(5)
    for offset, length in ((MiB - 5, 6), (-1, 2), (0, -1)):
        with pytest.raises(errors.UsageError):
            r.read_range(offset, length)


@pytest.mark.parametrize("method", [None, "lz4"])
def test_stored_frames_copied_in_one_write_give_the_same_stream(tmp_path: Path, method: str | None) -> None:
    """read_stored_batch + add_stored (consolidation's copy of runs) write exactly what add() writes."""
    m = meta(method)
    frames = [("data", i << 20, bytes([i + 1]) * 300_000 + os.urandom(200_000)) for i in range(4)]
    src = tmp_path / "src"
    with open(src, "wb") as f:
        write(f, m, frames)
    with open_stream(open(src, "rb"), str(src), owns=True) as r, io.BytesIO() as out:
        refs = r.frames()
        view, items = r.read_stored_batch([(ref.pos, ref.offset, ref.length) for ref in refs])
        assert [bytes(data) for _, _, data in items] == [val for _, _, val in frames]
        w = StreamWriter(out, m)
        copied = [EncodedFrame("data", head.offset, head.length, head.raw,
                               view[rel + FRAME.size:rel + FRAME.size + head.stored],
                               w.codec.stored_checksum(head, view[rel + FRAME.size:rel + FRAME.size + head.stored]))
                  for rel, head, _ in items]
        end = items[-1][0] + FRAME.size + items[-1][1].stored
        w.add_stored(copied, view[:end])
        w.finish()
        assert out.getvalue() == src.read_bytes()
        with pytest.raises(errors.UsageError, match="do not match"):
            StreamWriter(io.BytesIO(), m).add_stored(copied, view[:end - 1])


class _ObjectFile(io.BytesIO):
    """A seekable file without a descriptor that answers ``pread`` like a ranged GET (s3store.RangedObject):
    fewer bytes only at the end of the object."""

    def fileno(self) -> int:
        raise io.UnsupportedOperation("no descriptor")

    def pread(self, length: int, offset: int) -> bytes:
        return self.getvalue()[offset:offset + length]


def test_batch_read_of_a_compressed_last_frame_through_pread(tmp_path: Path) -> None:
    """A batch's span reaches past the file's end when its last frame is compressed well (a restore
    from object storage said "truncated frames" there); it must read what is there, like os.pread."""
    path = tmp_path / "sda.full.data"
    text = b"marker " * (MiB // 7)
    with fsutil.partial_file(path) as f:
        write(f, meta("lz4"), [("data", 0, os.urandom(4096)), ("data", MiB, text)], str(path))
    with open_stream(_ObjectFile(path.read_bytes())) as r:
        refs = [ref for ref in r.frames() if ref.kind == "data"]
        assert refs[-1].pos + FRAME.size + refs[-1].length > path.stat().st_size     # the span passes the end
        got = r.read_batch([(ref.pos, ref.offset, ref.length) for ref in refs])
    assert bytes(got[1]) == text
