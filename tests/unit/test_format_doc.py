"""docs/FORMAT.md is exact: its hex example is what the writer produces, and a
small reader written from the document alone (struct + xxhash, no virtnbd
code) decodes it and checks every checksum."""
from __future__ import annotations

import io
import json
import re
import struct
from pathlib import Path

import xxhash

from virtnbd.stream import StreamMeta, StreamWriter

DOC = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"


def example_stream() -> bytes:
    m = StreamMeta(virtual_size=8192, disk="sda", disk_format="raw", level="full", checkpoint="virtnbdbackup.0",
                   parent=None, time="2026-11-22T04:00:00+00:00", compression=None, tool_version="0.1.0", extra={})
    buf = io.BytesIO()
    with StreamWriter(buf, m) as w:
        w.write_data(0, b"hello, virtnbd!\n")
        w.write_zero(4096, 4096)
    return buf.getvalue()


def doc_hex() -> bytes:
    text = DOC.read_text().split("### 2.7", 1)[1].split("```", 2)[1]
    out = bytearray()
    for line in text.strip().splitlines():
        m = re.match(r"^[0-9a-f]{8}: ((?:[0-9a-f]{2,4} ?){1,8})", line)
        assert m, line
        out += bytes.fromhex(m.group(1).replace(" ", ""))
    return bytes(out)


def h128(b: bytes) -> bytes:
    return xxhash.xxh3_128_digest(b)


def independent_read(blob: bytes) -> tuple[dict[str, object], list[tuple[str, int, bytes | int]], bytes]:
    magic, version, flags, meta_len = struct.unpack_from("<8sHHI", blob, 0)
    assert (magic, version, flags) == (b"VNBDSTRM", 1, 0)
    meta = json.loads(blob[16:16 + meta_len])
    assert h128(blob[:16 + meta_len]) == blob[16 + meta_len:32 + meta_len]
    d = blob[16 + meta_len:32 + meta_len]
    pos, frames = 32 + meta_len, []
    while True:
        kind, method, fl, off, length, stored, csum, hcheck = struct.unpack_from("<BBHQQQ16sI", blob, pos)
        assert fl == 0 and hcheck == xxhash.xxh32_intdigest(blob[pos:pos + 44])
        if kind == 0x45:
            totals = blob[pos + 48:pos + 80]
            assert h128(d + totals) == csum
            digest, end_pos = csum, pos
            break
        record = blob[pos:pos + 48]
        if kind == 0x44:
            assert method == 0
            payload = blob[pos + 48:pos + 48 + stored]
            assert h128(payload) == csum
            frames.append(("data", off, payload))
        else:
            frames.append(("zero", off, length))
        d = h128(d + record)
        pos += 48 + stored
    assert struct.unpack("<QQQQ", totals)[0] == len(frames)
    end_pos2, index_pos, count, check, magic2 = struct.unpack_from("<QQQ16s8s", blob, len(blob) - 48)
    assert (end_pos2, magic2, count) == (end_pos, b"VNBDINDX", len(frames))
    entries = blob[index_pos:index_pos + 32 * count]
    assert h128(digest + entries + blob[len(blob) - 48:len(blob) - 24]) == check
    return meta, frames, digest


def test_doc_example_matches_writer() -> None:
    assert doc_hex() == example_stream()


def test_independent_reader_decodes_example() -> None:
    meta, frames, digest = independent_read(doc_hex())
    assert meta["virtual_size"] == 8192 and meta["disk"] == "sda"
    assert frames == [("data", 0, b"hello, virtnbd!\n"), ("zero", 4096, 4096)]
    assert digest.hex() == "30331a17ad7613e4717cc5509d7a1b0f"
