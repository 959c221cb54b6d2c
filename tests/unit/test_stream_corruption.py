"""Corruption tests: every truncation point and single-byte flips are detected.

For each small stream, damage must surface as FormatError naming the file and
an offset inside it, and no read path may ever return bytes that differ from
what was written.
"""
from __future__ import annotations

import io
import random
from collections.abc import Callable

import pytest

from tests.unit.stream_helpers import Layout, meta, pipe, stream_bytes
from virtnbd import errors
from virtnbd.stream import StreamMeta, open_stream

NAME = "/backup/sda.full.data"


def small_layout() -> Layout:
    rng = random.Random(7)
    return [("data", 0, rng.randbytes(300)), ("zero", 300, 700), ("data", 4096, b"pattern!" * 64),
            ("data", 5000, bytes(200)), ("zero", 8192, 1 << 20)]


CASES: list[tuple[str, StreamMeta, Layout]] = [
    ("plain", meta(None, size=2 << 20), small_layout()),
    ("lz4", meta("lz4", size=2 << 20), small_layout()),
    ("zstd", meta("zstd", size=2 << 20), small_layout()),
    ("empty", meta(None, size=0), []),
]


def expected(layout: Layout) -> dict[int, bytes | None]:
    return {off: (val if kind == "data" else None) for kind, off, val in layout}


def assert_format_error(fn: Callable[[], object], size: int) -> errors.FormatError:
    with pytest.raises(errors.FormatError) as exc:
        fn()
    err = exc.value
    assert err.path == NAME and isinstance(err.offset, int) and 0 <= err.offset <= size, err.fields
    assert str(err).startswith(f"{NAME}: offset {err.offset}: ")
    return err


def check_sequential(blob: bytes, want: dict[int, bytes | None], source: io.IOBase) -> None:
    """verify()/iter_frames must raise FormatError; whatever was yielded before must be right."""
    def run() -> None:
        reader = open_stream(source, path=NAME)  # type: ignore[arg-type]
        for ref, data in reader.iter_frames():
            assert ref.offset in want and data == want[ref.offset]
    assert_format_error(run, len(blob))


def check_random_access(blob: bytes, want: dict[int, bytes | None]) -> None:
    """frames()/read(): either FormatError or exactly the written bytes."""
    try:
        reader = open_stream(io.BytesIO(blob), path=NAME)
        for ref in reader.frames():
            data = reader.read(ref)
            assert ref.offset in want
            assert data == (want[ref.offset] if want[ref.offset] is not None else bytes(ref.length))
    except errors.FormatError as err:
        assert err.path == NAME and 0 <= err.offset <= len(blob)


@pytest.mark.parametrize(("name", "m", "layout"), CASES, ids=[c[0] for c in CASES])
def test_every_truncation_is_detected(name: str, m: StreamMeta, layout: Layout) -> None:
    blob = stream_bytes(m, layout)
    want = expected(layout)
    for cut in range(len(blob)):
        short = blob[:cut]
        assert_format_error(lambda s=short: open_stream(io.BytesIO(s), path=NAME).verify(), len(short))
        assert_format_error(lambda s=short: open_stream(io.BytesIO(s), path=NAME).frames(), len(short))
        if cut % 7 == 0:
            check_sequential(short, want, pipe(short))


@pytest.mark.parametrize(("name", "m", "layout"), CASES, ids=[c[0] for c in CASES])
def test_every_byte_flip_is_detected(name: str, m: StreamMeta, layout: Layout) -> None:
    blob = stream_bytes(m, layout)
    want = expected(layout)
    rng = random.Random(name)
    for pos in range(len(blob)):
        damaged = bytearray(blob)
        damaged[pos] ^= rng.randrange(1, 256)
        bad = bytes(damaged)
        check_sequential(bad, want, io.BytesIO(bad))
        check_random_access(bad, want)


@pytest.mark.parametrize(("name", "m", "layout"), CASES[:3], ids=[c[0] for c in CASES[:3]])
def test_trailing_garbage_reordering_and_lost_frames(name: str, m: StreamMeta, layout: Layout) -> None:
    blob = stream_bytes(m, layout)
    assert_format_error(lambda: open_stream(io.BytesIO(blob + b"\0"), path=NAME).verify(), len(blob) + 1)
    with_lost = stream_bytes(m, layout[:1] + layout[2:])      # same stream minus one frame ...
    refs = open_stream(io.BytesIO(blob), path=NAME).frames()
    lost_refs = open_stream(io.BytesIO(with_lost), path=NAME).frames()
    # ... spliced: original header + frames, the other stream's end frame and index
    end_pos = refs[-1].pos + 48
    other_end = lost_refs[-1].pos + 48
    spliced = blob[:end_pos] + with_lost[other_end:]
    assert_format_error(lambda: open_stream(io.BytesIO(spliced), path=NAME).verify(), len(spliced))
    # swap two frames of equal size (zero frames) -> order / digest failure
    a, b = refs[1], refs[4]
    swapped = bytearray(blob)
    swapped[a.pos:a.pos + 48], swapped[b.pos:b.pos + 48] = blob[b.pos:b.pos + 48], blob[a.pos:a.pos + 48]
    assert_format_error(lambda: open_stream(io.BytesIO(bytes(swapped)), path=NAME).verify(), len(blob))


def test_chained_digest_catches_frames_from_another_stream() -> None:
    """Frames of stream B under the end frame and index of stream A (same layout, other data):
    every frame, the totals and the index are self-consistent; only the chained digest differs."""
    m = meta(None, size=2 << 20)
    a = stream_bytes(m, [("data", 0, b"a" * 500), ("zero", 500, 500)])
    b = stream_bytes(m, [("data", 0, b"b" * 500), ("zero", 500, 500)])
    end_pos = open_stream(io.BytesIO(a), path=NAME).frames()[-1].pos + 48
    spliced = b[:end_pos] + a[end_pos:]
    err = assert_format_error(lambda: open_stream(io.BytesIO(spliced), path=NAME).verify(), len(spliced))
    assert err.reason == "chained digest mismatch" and err.offset == end_pos
