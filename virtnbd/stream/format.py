"""The virtnbd stream format: records, byte layouts and checksums (spec: docs/FORMAT.md).

Layout of one stream file (all integers little-endian)::

    header      magic "VNBDSTRM", u16 version, u16 flags, u32 meta_len,
                meta JSON (meta_len bytes), xxh3-128 of everything before it
    frames      48-byte frame header (+ payload for data frames), ascending offsets
    end frame   48-byte header (kind "E", chained digest) + 32-byte totals
    index       count x 32-byte entries (kind, offset, length, pos)
    footer      48 bytes: end_pos, index_pos, count, index check, magic "VNBDINDX"
"""
from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import xxhash

from virtnbd import errors

MAGIC = b"VNBDSTRM"
INDEX_MAGIC = b"VNBDINDX"
VERSION = 1

HEADER = struct.Struct("<8sHHI")          # magic, version, flags, meta_len
HEADER_CHECK_SIZE = 16                     # xxh3-128 of header + meta
MAX_META_LEN = 1 << 20

FRAME = struct.Struct("<BBHQQQ16sI")       # kind, method, flags, offset, length, stored, checksum, hcheck
FRAME_CHECKED = FRAME.size - 4             # bytes covered by hcheck
END_PAYLOAD = struct.Struct("<QQQQ")       # frames, data_bytes, zero_bytes, payload_bytes
INDEX_ENTRY = struct.Struct("<B7xQQQ")     # kind, offset, length, pos
FOOTER = struct.Struct("<QQQ16s8s")        # end_pos, index_pos, count, index_check, magic

KIND_DATA = 0x44   # "D"
KIND_ZERO = 0x5A   # "Z"
KIND_END = 0x45    # "E"
KIND_NAMES = {KIND_DATA: "data", KIND_ZERO: "zero"}
KIND_CODES = {"data": KIND_DATA, "zero": KIND_ZERO}

METHOD_NONE = 0
METHOD_LZ4 = 1
METHOD_ZSTD = 2
METHOD_CODES: dict[str | None, int] = {None: METHOD_NONE, "lz4": METHOD_LZ4, "zstd": METHOD_ZSTD}
METHOD_NAMES = {code: name for name, code in METHOD_CODES.items()}

MAX_FRAME_LENGTH = 64 << 20                # largest data frame (uncompressed) a writer may emit
FLAGGED_SLACK = 64                         # a frame with stage flags may store this much more than length (AEAD tag)
NO_CHECKSUM = bytes(16)

META_KEYS = ("virtual_size", "disk", "disk_format", "level", "checkpoint", "parent",
             "time", "compression", "tool_version", "extra")
LEVELS = ("copy", "full", "inc", "diff")


@dataclass(frozen=True)
class StreamMeta:
    virtual_size: int
    disk: str
    disk_format: str
    level: str
    checkpoint: str | None
    parent: str | None
    time: str
    compression: str | None
    tool_version: str
    extra: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class FrameRef:
    kind: str      # "data" | "zero"
    offset: int    # disk offset
    length: int    # disk bytes covered
    pos: int       # file position of the frame header


@dataclass(frozen=True)
class StreamTotals:
    frames: int
    data_bytes: int
    zero_bytes: int
    stored_bytes: int   # size of the whole stream file in bytes
    digest: str         # chained digest from the end frame (hex)
    file_digest: str    # xxh3-128 of the whole file (hex)


@dataclass(frozen=True)
class EncodedFrame:
    """A frame ready to be appended by :meth:`StreamWriter.add`."""

    kind: str
    offset: int
    length: int
    header: bytes                   # the 48 packed header bytes
    payload: bytes | memoryview     # stored bytes (empty for zero frames)
    stored_checksum: bytes = b""    # xxh3-128 of a compressed payload (chained), empty otherwise
    tail: bytes = b""               # stored right after ``payload`` (an in-place AEAD seal's tag), empty otherwise

    @property
    def chain_record(self) -> bytes:
        return self.header + self.stored_checksum


def checksum(data: bytes | bytearray | memoryview) -> bytes:
    """xxh3-128 of ``data`` as 16 bytes (canonical, big-endian)."""
    return xxhash.xxh3_128_digest(data)


def chain_step(prev: bytes, record: bytes) -> bytes:
    """One step of the chained digest: xxh3-128(prev || record)."""
    return xxhash.xxh3_128_digest(prev + record)


def header_check(head: bytes) -> int:
    return xxhash.xxh32_intdigest(head[:FRAME_CHECKED])


def pack_frame(kind: int, method: int, offset: int, length: int, stored: int, csum: bytes,  # noqa: PLR0917
               flags: int = 0) -> bytes:
    head = FRAME.pack(kind, method, flags, offset, length, stored, csum, 0)
    return head[:FRAME_CHECKED] + struct.pack("<I", header_check(head))


@dataclass(frozen=True)
class FrameHeader:
    kind: int
    method: int
    offset: int
    length: int
    stored: int
    checksum: bytes
    raw: bytes
    flags: int = 0      # frame flags: bits of codec stages applied (stream/codec.py)


def unpack_frame(raw: bytes, path: str, pos: int, known_flags: int = 0) -> FrameHeader:
    """Parse and self-check one 48-byte frame header read at file position ``pos``.

    ``known_flags``: the frame flag bits the reader's codec pipeline can undo.
    """
    if len(raw) != FRAME.size:
        raise errors.FormatError(path=path, offset=pos, reason="truncated frame header")
    kind, method, flags, offset, length, stored, csum, hcheck = FRAME.unpack(raw)
    if hcheck != header_check(raw):
        raise errors.FormatError(path=path, offset=pos, reason="frame header checksum mismatch")
    if flags & ~known_flags:
        raise errors.FormatError(path=path, offset=pos, reason=f"unknown frame flags {flags:#x}")
    if kind == KIND_DATA:
        room = length + (FLAGGED_SLACK if flags else 0)
        if method not in METHOD_NAMES or not 0 < length <= MAX_FRAME_LENGTH or not 0 < stored <= room:
            raise errors.FormatError(path=path, offset=pos, reason="invalid data frame header")
        if method == METHOD_NONE and not flags and stored != length:
            raise errors.FormatError(path=path, offset=pos, reason="uncompressed frame with stored != length")
    elif kind == KIND_ZERO:
        if method != METHOD_NONE or length <= 0 or stored != 0 or csum != NO_CHECKSUM:
            raise errors.FormatError(path=path, offset=pos, reason="invalid zero frame header")
    elif kind == KIND_END:
        if method != METHOD_NONE or offset != 0 or length != 0 or stored != END_PAYLOAD.size:
            raise errors.FormatError(path=path, offset=pos, reason="invalid end frame header")
    else:
        raise errors.FormatError(path=path, offset=pos, reason=f"unknown frame kind {kind:#x}")
    return FrameHeader(kind, method, offset, length, stored, csum, raw, flags)


def meta_to_dict(meta: StreamMeta) -> dict[str, Any]:
    return {
        "virtual_size": meta.virtual_size,
        "disk": meta.disk,
        "disk_format": meta.disk_format,
        "level": meta.level,
        "checkpoint": meta.checkpoint,
        "parent": meta.parent,
        "time": meta.time,
        "compression": meta.compression,
        "tool_version": meta.tool_version,
        "extra": dict(meta.extra),
    }


def validate_meta(meta: StreamMeta, path: str) -> None:
    """Raise FormatError when ``meta`` cannot be written or was read damaged."""
    problems = []
    if not isinstance(meta.virtual_size, int) or isinstance(meta.virtual_size, bool) or meta.virtual_size < 0:
        problems.append("virtual_size must be a non-negative integer")
    for name in ("disk", "disk_format", "level", "time", "tool_version"):
        if not isinstance(getattr(meta, name), str):
            problems.append(f"{name} must be a string")
    for name in ("checkpoint", "parent"):
        if getattr(meta, name) is not None and not isinstance(getattr(meta, name), str):
            problems.append(f"{name} must be a string or null")
    if meta.level not in LEVELS:
        problems.append(f"level must be one of {', '.join(LEVELS)}")
    if meta.compression not in METHOD_CODES:
        problems.append("compression must be null, lz4 or zstd")
    if not isinstance(meta.extra, Mapping):
        problems.append("extra must be an object")
    if problems:
        raise errors.FormatError(path=path, offset=HEADER.size, reason="bad metadata: " + "; ".join(problems))


def encode_header(meta: StreamMeta, path: str, flags: int = 0) -> bytes:
    validate_meta(meta, path)
    try:
        body = json.dumps(meta_to_dict(meta), sort_keys=True, separators=(",", ":")).encode()
    except (TypeError, ValueError) as err:
        raise errors.FormatError(path=path, offset=HEADER.size,
                                 reason=f"metadata not JSON-serialisable: {err}") from err
    if len(body) > MAX_META_LEN:
        raise errors.FormatError(path=path, offset=HEADER.size, reason="metadata larger than 1 MiB")
    head = HEADER.pack(MAGIC, VERSION, flags, len(body)) + body
    return head + checksum(head)


def parse_header_prefix(raw: bytes, path: str, known_flags: int = 0) -> int:
    """Check the fixed 16-byte header prefix; return the meta length.

    ``known_flags``: the header flag bits of the reader's codec stages.
    """
    if len(raw) < HEADER.size:
        raise errors.FormatError(path=path, offset=0, reason="truncated header")
    magic, version, flags, meta_len = HEADER.unpack(raw[:HEADER.size])
    if magic != MAGIC:
        raise errors.FormatError(path=path, offset=0, reason="not a virtnbd stream (bad magic)")
    if version != VERSION:
        raise errors.FormatError(path=path, offset=8, reason=f"unsupported stream version {version}")
    if flags & ~known_flags:
        raise errors.FormatError(path=path, offset=10, reason=f"unknown header flags {flags:#x}")
    if meta_len > MAX_META_LEN:
        raise errors.FormatError(path=path, offset=12, reason="metadata length out of range")
    return int(meta_len)


def decode_meta(head: bytes, check: bytes, path: str) -> StreamMeta:
    """``head`` = fixed header + meta JSON; ``check`` = the 16 bytes that follow it."""
    if len(check) != HEADER_CHECK_SIZE:
        raise errors.FormatError(path=path, offset=len(head), reason="truncated header")
    if checksum(head) != check:
        raise errors.FormatError(path=path, offset=len(head), reason="header checksum mismatch")
    try:
        obj = json.loads(head[HEADER.size:].decode())
    except (UnicodeDecodeError, ValueError) as err:
        raise errors.FormatError(path=path, offset=HEADER.size, reason=f"metadata is not JSON: {err}") from err
    if not isinstance(obj, dict) or any(key not in obj for key in META_KEYS):
        raise errors.FormatError(path=path, offset=HEADER.size, reason="metadata lacks required keys")
    meta = StreamMeta(**{key: obj[key] for key in META_KEYS})
    validate_meta(meta, path)
    return StreamMeta(**{**{key: obj[key] for key in META_KEYS}, "extra": MappingProxyType(dict(obj["extra"]))})
