"""Reader for virtnbdbackup (abbbi/virtnbdbackup) sparse streams (spec: docs/LEGACY_FORMAT.md).

A sparse stream is a sequence of 40-byte ASCII frame headers
``b"%4s %016x %016x\\r\\n" % (kind, start, length)``: a ``meta`` frame with a
JSON payload, ``data`` frames with their payload, ``zero`` frames, a ``stop``
frame; compressed streams (version 2) then carry a JSON trailer of the
compressed sizes and a final ``comp`` frame.

:class:`LegacyStreamReader` offers the interface of
:class:`virtnbd.stream.reader.StreamReader`. The format has no per-frame
checksums: what it offers is checked (frame syntax, order, terminators,
``dataSize``, trailer consistency, the lz4 frame checksums virtnbdbackup
enables, and the adler32 of the whole file from the ``.chksum`` file when
present).
"""
from __future__ import annotations

import json
import os
import re
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, BinaryIO

import lz4.frame
import xxhash

from virtnbd import errors
from virtnbd.stream.format import FrameRef, StreamMeta, StreamTotals
from virtnbd.stream.reader import ByFrames, StreamReader

FRAME_LEN = 40
TERM = b"\r\n"
KINDS = (b"meta", b"data", b"zero", b"stop", b"comp")
_FRAME_RE = re.compile(rb"^(meta|data|zero|stop|comp) ([0-9a-f]{16}) ([0-9a-f]{16})\r\n$")
MAX_META = 1 << 20
MAX_TRAILER = 256 << 20
READ_CHUNK = 8 << 20
SPLIT = 16 << 20      # uncompressed data frames (one per extent, any size) are served in pieces of this size
LZ4_HEADER_MAX = 19
LEVEL_FROM_NAME = re.compile(r"\.(full|copy|inc|diff)\.")


def detect(probe: bytes) -> bool:
    """True when ``probe`` (the first bytes of a file) starts a virtnbdbackup stream."""
    return _FRAME_RE.match(probe[:FRAME_LEN]) is not None and probe.startswith(b"meta ")


def parse_frame(raw: bytes, path: str, pos: int) -> tuple[bytes, int, int]:
    m = _FRAME_RE.match(raw)
    if m is None:
        what = "truncated frame header" if len(raw) < FRAME_LEN else "invalid frame header"
        raise errors.FormatError(path=path, offset=pos, reason=f"{what} {raw[:FRAME_LEN]!r}")
    return m.group(1), int(m.group(2), 16), int(m.group(3), 16)


def adler32_of_chksum_file(path: str) -> int | None:
    """The adler32 recorded in ``<path>.chksum`` (None when absent or unusable)."""
    try:
        with open(path + ".chksum", "rb") as f:
            text = f.read(64).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@dataclass(frozen=True)
class _Entry:
    """One piece of a data frame as the reader serves it: raw bytes, or one lz4 frame."""

    ref: FrameRef
    payload_pos: int            # file position of the piece's stored bytes
    stored: int                 # stored bytes (= ref.length when not compressed)
    compressed: bool


class LegacyStreamReader(ByFrames, StreamReader):
    """A virtnbdbackup sparse stream behind the StreamReader interface (seekable files only)."""

    def __init__(self, f: BinaryIO, path: str = "<stream>", owns: bool = False) -> None:  # noqa: PLR0915
        self.path = path
        self._f = f
        self._owns = owns
        self._frames: list[FrameRef] | None = None
        self._starts: list[int] = []
        self._totals: StreamTotals | None = None
        self._entries: dict[int, _Entry] = {}
        self._adler_checked = False
        self._adler_lock = threading.Lock()
        try:
            self._seekable = f.seekable()
            self._fd: int | None = f.fileno()
        except (OSError, ValueError, AttributeError):
            self._fd = None
        if not getattr(self, "_seekable", False):
            raise errors.UsageError(reason=f"{path}: virtnbdbackup streams can only be read from a seekable file")
        self._size = self._file_size()
        kind, _, meta_len = parse_frame(self._pread(0, FRAME_LEN, "meta frame"), path, 0)
        if kind != b"meta" or meta_len > MAX_META:
            raise errors.FormatError(path=path, offset=0, reason="stream does not start with a meta frame")
        body = self._pread(FRAME_LEN, meta_len + len(TERM), "meta frame")
        if body[-2:] != TERM:
            raise errors.FormatError(path=path, offset=FRAME_LEN + meta_len, reason="meta frame not terminated")
        try:
            raw = json.loads(body[:-2].decode())
        except (UnicodeDecodeError, ValueError) as err:
            raise errors.FormatError(path=path, offset=FRAME_LEN, reason=f"metadata is not JSON: {err}") from err
        if not isinstance(raw, dict):
            raise errors.FormatError(path=path, offset=FRAME_LEN, reason="metadata is not a JSON object")
        self.raw_meta: dict[str, Any] = raw
        self._data_start = FRAME_LEN + meta_len + len(TERM)
        self.meta = self._meta_from(raw)
        version = raw.get("streamVersion", raw.get("stream-version", 1))
        self.stream_version = version if isinstance(version, int) and not isinstance(version, bool) else 1
        self._trailer = self._load_trailer()

    # -- metadata ---------------------------------------------------------------

    def _meta_from(self, raw: dict[str, Any]) -> StreamMeta:
        for key in ("virtualSize", "dataSize"):
            value = raw.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise errors.FormatError(path=self.path, offset=FRAME_LEN,
                                         reason=f"metadata key {key!r} missing or not a size")
        virtual_size = raw["virtualSize"]
        level = self._level(bool(raw.get("incremental")))
        checkpoint = raw.get("checkpointName") or None
        parent = raw.get("parentCheckpoint") or None
        compressed = raw.get("compressed")
        extra = {"legacy": True, "legacy_meta": dict(raw)}
        return StreamMeta(
            virtual_size=virtual_size, disk=str(raw.get("diskName") or "unknown"),
            disk_format=str(raw.get("diskFormat") or "qcow2"), level=level,
            checkpoint=checkpoint if level in ("full", "inc") else None,
            parent=parent if level in ("inc", "diff") else None,
            time=str(raw.get("date") or ""),
            compression="lz4" if compressed not in (None, False) else None,
            tool_version="virtnbdbackup", extra=MappingProxyType(extra))

    def _level(self, incremental: bool) -> str:
        m = LEVEL_FROM_NAME.search(os.path.basename(self.path))
        if m:
            return m.group(1)
        return "inc" if incremental else "full"

    # -- compression trailer ----------------------------------------------------

    def _load_trailer(self) -> list[tuple[int, ...]] | None:
        """Compressed sizes per data frame, or None for an uncompressed stream."""
        if self._size < self._data_start + 2 * FRAME_LEN:
            if self.meta.compression:
                raise errors.FormatError(path=self.path, offset=self._size, reason="truncated (no trailer)")
            return None
        last_pos = self._size - FRAME_LEN
        tail = self._pread(last_pos, FRAME_LEN, "last frame")
        is_comp = tail.startswith(b"comp ")
        if not is_comp:
            if self.meta.compression:
                raise errors.FormatError(path=self.path, offset=last_pos,
                                         reason="compressed stream without compression trailer (truncated?)")
            return None
        _, _, length = parse_frame(tail, self.path, last_pos)
        start = last_pos - len(TERM) - length
        if length > MAX_TRAILER or start < self._data_start:
            raise errors.FormatError(path=self.path, offset=last_pos, reason="compression trailer length out of range")
        body = self._pread(start, length + len(TERM), "compression trailer")
        if body[-2:] != TERM:
            raise errors.FormatError(path=self.path, offset=start + length, reason="trailer not terminated")
        try:
            entries = json.loads(body[:-2].decode())
        except (UnicodeDecodeError, ValueError) as err:
            raise errors.FormatError(path=self.path, offset=start, reason=f"trailer is not JSON: {err}") from err
        if not isinstance(entries, list):
            raise errors.FormatError(path=self.path, offset=start, reason="trailer is not a JSON list")
        self._trailer_pos = start
        return [self._trailer_entry(e, start) for e in entries]

    def _trailer_entry(self, entry: Any, pos: int) -> tuple[int, ...]:
        if isinstance(entry, int) and not isinstance(entry, bool) and entry > 0:
            return (entry,)
        if isinstance(entry, dict) and len(entry) == 1:
            (total, sizes), = entry.items()
            if (isinstance(sizes, list) and sizes and str(total).isdigit()
                    and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes)
                    and sum(sizes) == int(total)):
                return tuple(sizes)
        raise errors.FormatError(path=self.path, offset=pos, reason=f"invalid compression trailer entry {entry!r}")

    # -- frames ---------------------------------------------------------------------

    def frames(self) -> list[FrameRef]:
        if self._frames is None:
            entries = list(self._scan_headers())
            self._entries = {e.ref.pos: e for e in entries}
            self._frames = [e.ref for e in entries]
            self._starts = [ref.offset for ref in self._frames]
        return list(self._frames)

    def _scan_headers(self) -> Iterator[_Entry]:
        pos, next_offset, n_data, data_bytes = self._data_start, 0, 0, 0
        while True:
            kind, start, length = parse_frame(self._pread(pos, FRAME_LEN, "frame header"), self.path, pos)
            if kind == b"stop":
                break
            if kind not in (b"data", b"zero") or length <= 0:
                raise errors.FormatError(path=self.path, offset=pos, reason=f"unexpected {kind.decode()} frame")
            if start < next_offset or start + length > self.meta.virtual_size:
                raise errors.FormatError(path=self.path, offset=pos, reason="frame out of order or beyond disk size")
            next_offset = start + length
            if kind == b"zero":
                yield _Entry(FrameRef("zero", start, length, pos), pos + FRAME_LEN, 0, False)
                pos += FRAME_LEN
                continue
            sizes: tuple[int, ...] = (length,)
            if self._trailer is not None:
                if n_data >= len(self._trailer):
                    raise errors.FormatError(path=self.path, offset=pos, reason="more data frames than trailer entries")
                sizes = self._trailer[n_data]
            n_data += 1
            data_bytes += length
            end = pos + FRAME_LEN + sum(sizes) + len(TERM)
            if end > self._size:
                raise errors.FormatError(path=self.path, offset=pos,
                                         reason="data frame extends beyond the end of the file (truncated)")
            if self._pread(end - len(TERM), len(TERM), "terminator") != TERM:
                raise errors.FormatError(path=self.path, offset=end - len(TERM), reason="data frame not terminated")
            yield from self._pieces(start, length, pos + FRAME_LEN, sizes)
            pos = end
        self._check_end(pos, n_data, data_bytes)

    def _pieces(self, start: int, length: int, payload: int, sizes: tuple[int, ...]) -> Iterator[_Entry]:
        """Split one data frame into pieces a reader can serve with bounded memory."""
        if self._trailer is None:
            for k in range(0, length, SPLIT):
                n = min(SPLIT, length - k)
                yield _Entry(FrameRef("data", start + k, n, payload + k), payload + k, n, False)
            return
        if len(sizes) == 1:
            yield _Entry(FrameRef("data", start, length, payload), payload, sizes[0], True)
            return
        offset, at = start, payload       # chunked: one lz4 frame per chunk, content size in its header
        for size in sizes:
            n = self._lz4_content_size(at, size)
            yield _Entry(FrameRef("data", offset, n, at), at, size, True)
            offset += n
            at += size
        if offset != start + length:
            raise errors.FormatError(path=self.path, offset=payload,
                                     reason=f"chunks decompress to {offset - start} bytes, frame says {length}")

    def _lz4_content_size(self, pos: int, size: int) -> int:
        head = self._pread(pos, min(size, LZ4_HEADER_MAX), "lz4 frame header")
        try:
            content = int(lz4.frame.get_frame_info(head).get("content_size") or 0)
        except RuntimeError as err:
            raise errors.FormatError(path=self.path, offset=pos, reason=f"lz4 frame header corrupt: {err}") from err
        if content <= 0:
            raise errors.FormatError(path=self.path, offset=pos, reason="lz4 chunk without content size")
        return content

    def _check_end(self, stop_pos: int, n_data: int, data_bytes: int) -> None:
        end = stop_pos + FRAME_LEN
        if self._trailer is not None:
            if n_data != len(self._trailer):
                raise errors.FormatError(path=self.path, offset=stop_pos,
                                         reason=f"{n_data} data frames but {len(self._trailer)} trailer entries")
            if end != self._trailer_pos:
                raise errors.FormatError(path=self.path, offset=end, reason="unexpected bytes before the trailer")
        elif end != self._size:
            raise errors.FormatError(path=self.path, offset=end, reason="trailing bytes after the stop frame")
        if data_bytes != self.raw_meta["dataSize"]:
            raise errors.FormatError(path=self.path, offset=stop_pos,
                                     reason=f"data frames hold {data_bytes} bytes, metadata says "
                                            f"{self.raw_meta['dataSize']}")

    def _check_recorded_adler(self) -> None:
        """Before handing out data: the whole file against the adler32 of its ``.chksum`` (once)."""
        with self._adler_lock:               # restore reads frames from a worker pool
            if self._adler_checked:
                return
            if adler32_of_chksum_file(self.path) is not None:
                self._whole_file_totals()
            self._adler_checked = True

    def read(self, ref: FrameRef) -> bytes:
        self.frames()
        self._check_recorded_adler()
        entry = self._entries.get(ref.pos)
        if entry is None or entry.ref != ref:
            raise errors.FormatError(path=self.path, offset=ref.pos, reason="no such frame in the stream")
        if ref.kind == "zero":
            return bytes(ref.length)
        stored = self._pread(entry.payload_pos, entry.stored, "frame payload")
        if not entry.compressed:
            return stored
        return self._decompress(stored, entry)

    def _decompress(self, stored: bytes, entry: _Entry) -> bytes:
        try:
            dec = lz4.frame.LZ4FrameDecompressor()
            data = dec.decompress(stored, max_length=entry.ref.length)
            complete = dec.eof and not dec.unused_data
        except RuntimeError as err:
            raise errors.FormatError(path=self.path, offset=entry.payload_pos,
                                     reason=f"lz4 frame corrupt: {err}") from err
        if not complete:
            raise errors.FormatError(path=self.path, offset=entry.payload_pos,
                                     reason="lz4 frame incomplete or with trailing bytes")
        if len(data) != entry.ref.length:
            raise errors.FormatError(path=self.path, offset=entry.ref.pos,
                                     reason=f"frame decompresses to {len(data)} bytes, header says {entry.ref.length}")
        return data

    def iter_frames(self, reuse_buffer: bool = False) -> Iterator[tuple[FrameRef, bytes | None]]:
        self._check_recorded_adler()
        for ref in self.frames():
            yield ref, (self.read(ref) if ref.kind == "data" else None)
        if self._totals is None:
            self._totals = self._whole_file_totals()

    def _whole_file_totals(self) -> StreamTotals:
        hasher, adler, pos = xxhash.xxh3_128(), 1, 0
        while pos < self._size:
            chunk = self._pread(pos, min(READ_CHUNK, self._size - pos), "stream")
            hasher.update(chunk)
            adler = zlib.adler32(chunk, adler)
            pos += len(chunk)
        recorded = adler32_of_chksum_file(self.path)
        if recorded is not None and recorded != adler:
            raise errors.FormatError(path=self.path, offset=0,
                                     reason=f"adler32 {adler} does not match {recorded} recorded in .chksum")
        frames = self.frames()
        self._totals = StreamTotals(frames=len(frames), data_bytes=sum(r.length for r in frames if r.kind == "data"),
                            zero_bytes=sum(r.length for r in frames if r.kind == "zero"), stored_bytes=self._size,
                            digest=f"adler32:{adler:08x}", file_digest=hasher.hexdigest())
        return self._totals

    def verify(self) -> StreamTotals:
        for _ in self.iter_frames():
            pass
        if self._totals is None:  # pragma: no cover - iter_frames sets it or raises
            raise errors.FormatError(path=self.path, offset=0, reason="stream not verified")
        return self._totals

    def __enter__(self) -> LegacyStreamReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class RawImageReader(ByFrames, StreamReader):
    """A plain raw image (virtnbdbackup saves raw-format disks so, as ``<dev>.copy.data``).

    Same interface: the whole image as data frames of ``chunk`` bytes. A raw
    image carries no checksums; only its size can be checked by the caller.
    Open it only for files the backup set marks as raw images
    (``DiskEntry.extra["raw_image"]``): any file is a valid raw image.
    """

    def __init__(self, f: BinaryIO, path: str = "<image>", owns: bool = False, chunk: int = 4 << 20) -> None:
        self.path = path
        self._f = f
        self._owns = owns
        self._frames = None
        self._starts = []
        self._totals = None
        self._seekable = True
        try:
            self._fd = f.fileno()
        except (OSError, ValueError, AttributeError):
            self._fd = None
        self._size = self._file_size()
        self._chunk = chunk
        self.meta = StreamMeta(virtual_size=self._size, disk=os.path.basename(path).split(".", 1)[0],
                               disk_format="raw", level="copy", checkpoint=None, parent=None, time="",
                               compression=None, tool_version="virtnbdbackup",
                               extra=MappingProxyType({"legacy": True, "raw_image": True}))

    def frames(self) -> list[FrameRef]:
        if self._frames is None:
            self._frames = [FrameRef("data", off, min(self._chunk, self._size - off), off)
                            for off in range(0, self._size, self._chunk)]
            self._starts = [ref.offset for ref in self._frames]
        return list(self._frames)

    def read(self, ref: FrameRef) -> bytes:
        if ref.kind != "data" or ref.pos != ref.offset or ref.offset + ref.length > self._size:
            raise errors.FormatError(path=self.path, offset=ref.pos, reason="no such range in the image")
        return self._pread(ref.offset, ref.length, "image")

    def iter_frames(self, reuse_buffer: bool = False) -> Iterator[tuple[FrameRef, bytes | None]]:
        hasher = xxhash.xxh3_128()
        for ref in self.frames():
            data = self.read(ref)
            hasher.update(data)
            yield ref, data
        self._totals = StreamTotals(frames=len(self.frames()), data_bytes=self._size, zero_bytes=0,
                                    stored_bytes=self._size, digest="", file_digest=hasher.hexdigest())

    def verify(self) -> StreamTotals:
        for _ in self.iter_frames():
            pass
        if self._totals is None:  # pragma: no cover - iter_frames sets it
            raise errors.FormatError(path=self.path, offset=0, reason="image not verified")
        return self._totals


def open_raw_image(path: str | os.PathLike[str]) -> RawImageReader:
    name = os.fspath(path)
    try:
        f = open(name, "rb")  # noqa: SIM115 - the reader owns and closes it
    except OSError as err:
        raise errors.FormatError(path=name, offset=0, reason=err.strerror or str(err)) from err
    return RawImageReader(f, name, owns=True)
