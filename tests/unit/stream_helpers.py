"""Shared helpers for the stream tests: metadata, writing layouts, a non-seekable reader."""
from __future__ import annotations

import io
from typing import Any

from virtnbd.stream import StreamMeta, StreamTotals, StreamWriter

Layout = list[tuple[str, int, Any]]   # (kind, offset, bytes for data | length for zero)


def meta(compression: str | None = None, size: int = 8 << 20, **kw: Any) -> StreamMeta:
    base: dict[str, Any] = dict(virtual_size=size, disk="sda", disk_format="qcow2", level="full",
                                checkpoint="virtnbdbackup.0", parent=None, time="2026-11-22T04:00:00+00:00",
                                compression=compression, tool_version="test", extra={"note": "x"})
    base.update(kw)
    return StreamMeta(**base)


def write_layout(f: Any, m: StreamMeta, layout: Layout, path: str = "<mem>", level: int | None = None) -> StreamTotals:
    with StreamWriter(f, m, path=path, level=level) as w:
        for kind, off, val in layout:
            if kind == "data":
                w.write_data(off, val)
            else:
                w.write_zero(off, val)
        return w.finish()


def image_of(layout: Layout, size: int) -> bytes:
    """The disk image a layout describes (zeros where no data frame is)."""
    img = bytearray(size)
    for kind, off, val in layout:
        if kind == "data":
            img[off:off + len(val)] = val
    return bytes(img)


def stream_bytes(m: StreamMeta, layout: Layout, level: int | None = None) -> bytes:
    buf = io.BytesIO()
    write_layout(buf, m, layout, level=level)
    return buf.getvalue()


class _RawPipe(io.RawIOBase):
    """Serves bytes in small, uneven pieces and cannot seek: behaves like a pipe."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._turn = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        self._turn += 1
        n = min(len(b), len(self._data) - self._pos, 1 + (self._turn * 7919) % 5000)
        b[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n


def pipe(data: bytes) -> io.BufferedReader:
    return io.BufferedReader(_RawPipe(data), buffer_size=4096)
