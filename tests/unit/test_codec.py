"""The frame codec pipeline (virtnbd/stream/codec.py): one place for the stages of writer and reader."""
from __future__ import annotations

import hashlib
import io

import pytest

from tests.unit.stream_helpers import meta, write_layout
from virtnbd import errors
from virtnbd.stream import StreamWriter, codec, encode_data, open_stream
from virtnbd.stream import format as fmt
from virtnbd.stream.codec import Buf, FrameDraft
from virtnbd.stream.format import FrameHeader

LAYOUT = [("data", 0, bytes(range(256)) * 300), ("zero", 76800, 4096), ("data", 1 << 20, b"xyz" * 50000),
          ("data", 2 << 20, b"\x01" * 4096), ("zero", 3 << 20, 1 << 20)]


class XorStage:
    """A toy keyed stage (stands in for encryption): flips every byte, marks frame and stream."""

    name = "xor"
    frame_flag = 0x1
    header_flag = 0x1

    def __init__(self, key: int) -> None:
        self.key = key

    def encode(self, frame: FrameDraft, data: Buf) -> Buf:
        frame.flags |= self.frame_flag
        return bytes(b ^ self.key for b in bytes(data))

    def decode(self, head: FrameHeader, data: Buf, path: str, pos: int) -> Buf:
        if not head.flags & self.frame_flag:
            return data
        return bytes(b ^ self.key for b in bytes(data))


def test_stream_bytes_are_those_of_the_format_before_the_pipeline() -> None:
    """Golden: the uncompressed stream of LAYOUT, byte for byte (sha256 taken before the codec refactor)."""
    buf = io.BytesIO()
    write_layout(buf, meta(None), LAYOUT)
    assert hashlib.sha256(buf.getvalue()).hexdigest() == \
        "674d3a8c6333c8ac2184a1040c7b353767c8c3bba5f9dad9041ae22b4a7d00c2"


@pytest.mark.parametrize("method", [None, "lz4", "zstd"])
def test_writer_and_module_encoder_use_the_same_pipeline(method: str | None) -> None:
    data = b"abc" * 30000
    with StreamWriter(io.BytesIO(), meta(method)) as w:
        assert w.codec is codec.pipeline(method)
        assert w.codec.encode_data(0, data) == encode_data(0, data, method)
    assert codec.pipeline(method).uncompressed.encode_data(0, data) == encode_data(0, data, None)


def test_pipeline_runs_stages_in_order_and_reader_reverses_them() -> None:
    stage = XorStage(0x5A)
    frame = codec.pipeline("zstd", None, (stage,)).encode_data(0, b"a" * 65536)
    kind, method, flags, *_ = fmt.FRAME.unpack(frame.header[:fmt.FRAME_CHECKED] + b"\0\0\0\0")
    assert (method, flags) == (fmt.METHOD_ZSTD, 0x1)           # compressed first, then the extra stage
    assert frame.stored_checksum == fmt.checksum(frame.payload)  # payload is not the disk bytes
    head = fmt.unpack_frame(frame.header, "<t>", 0, known_flags=0x1)
    assert codec.reading((stage,)).decode(head, frame.payload, "<t>", 0) == b"a" * 65536


def test_extra_stage_round_trips_and_marks_the_stream(tmp_path: object) -> None:
    stage = XorStage(0xA5)
    buf = io.BytesIO()
    with StreamWriter(buf, meta("lz4"), stages=(stage,)) as w:
        for kind, off, val in LAYOUT:
            w.write_data(off, val) if kind == "data" else w.write_zero(off, val)
    raw = buf.getvalue()
    assert fmt.HEADER.unpack(raw[:fmt.HEADER.size])[2] == 0x1
    with open_stream(io.BytesIO(raw), "<x>", stages=(stage,)) as r:
        refs = r.frames()
        assert r.read(refs[0]) == LAYOUT[0][2] and r.read(refs[2]) == LAYOUT[2][2]
        r.verify()
    with pytest.raises(errors.FormatError, match="unknown header flags"):
        open_stream(io.BytesIO(raw), "<x>")


def test_frame_flag_unknown_to_the_reader_is_refused() -> None:
    frame = codec.pipeline(None, None, (XorStage(1),)).encode_data(0, b"q" * 100)
    with pytest.raises(errors.FormatError, match="unknown frame flags"):
        fmt.unpack_frame(frame.header, "<t>", 0)
