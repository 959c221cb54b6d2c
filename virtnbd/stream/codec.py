"""The frame codec: one pipeline of stages between a frame's disk bytes and its stored payload.

Both directions use the same :class:`Codec`: the writer's ``encode_data`` runs
the stages in order, the reader's decode runs them backwards. A stage is an
object with (see :class:`Stage`)::

    name: str           # for messages ("checksum", "lz4", ...)
    frame_flag: int     # bit it sets in a frame header's u16 flags when it applied
                        # itself (0: recorded elsewhere, e.g. the method byte)
    header_flag: int    # bit it sets in the stream header's u16 flags (0: none)
    encode(frame: FrameDraft, data) -> bytes-like   # may set frame.checksum/method/flags
    decode(head: FrameHeader, data, path, pos) -> bytes-like   # raise FormatError(path, pos)

The order today is ``checksum`` (xxh3-128 of the disk bytes into the header's
checksum field; decode: compare, last) then ``compression`` (method byte 0/1/2;
decode: by the method byte, so a reader needs no setting). A further stage
(encryption) is appended by whoever owns its key (the backup set) through
``pipeline(..., extra=(stage,))`` / ``reading(extra=...)``; it marks frames
with its ``frame_flag`` and streams with its ``header_flag``, and the reader
refuses flags no stage of its pipeline knows. Its associated data can be built
from ``FrameDraft`` (encode) / ``FrameHeader`` (decode): kind, offset, length,
method. The file position is not known at encode time (frames are encoded in
a worker pool before the writer places them); the chained digest binds the order.

The stored checksum (xxh3-128 of the payload, part of the chained digest) is
present whenever the payload is not the disk bytes themselves, i.e. when the
method byte or any frame flag is set (:meth:`Codec.stored_checksum`).
Zero frames carry no payload and pass no stage.

Performance: the pipeline is built once per stream (``pipeline`` caches it);
per frame it costs one small object and one call per stage. A caller that
gives up its buffer (``encode_data(..., owned=True)``: the backup's read
buffer) lets a stage work in place (``FrameDraft.owned``); such a stage may
return its payload in two parts (``FrameDraft.tail``: stored right after the
payload, e.g. the AEAD tag), so no frame-sized buffer is allocated. A stage
with ``decodes_in_place`` is given a writable payload by the reader where it
can (the batch buffer) and may return a view into it; one with
``encode_in_pool`` (costly per byte) makes the backup encode even uncompressed
frames in its worker pool (:attr:`Codec.encode_in_pool`).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Protocol

from virtnbd import errors
from virtnbd.stream import compression
from virtnbd.stream import format as fmt
from virtnbd.stream.format import EncodedFrame, FrameHeader

Buf = bytes | bytearray | memoryview


class FrameDraft:
    """A data frame being encoded: what the stages fill in before the header is packed."""

    __slots__ = ("checksum", "flags", "length", "method", "offset", "owned", "tail")

    def __init__(self, offset: int, length: int, owned: bool = False) -> None:
        self.offset = offset
        self.length = length
        self.method = fmt.METHOD_NONE
        self.flags = 0
        self.checksum = fmt.NO_CHECKSUM
        self.owned = owned          # the caller gave up the data buffer: a stage may overwrite it (in place)
        self.tail = b""             # bytes the last stage stores after its payload (AEAD tag of an in-place seal)


class Stage(Protocol):
    name: str
    frame_flag: int
    header_flag: int

    def encode(self, frame: FrameDraft, data: Buf) -> Buf: ...

    def decode(self, head: FrameHeader, data: Buf, path: str, pos: int) -> Buf: ...


class ChecksumStage:
    """xxh3-128 of the disk bytes in the header; the reader compares after all other stages.

    A later stage with ``replaces_checksum`` (encryption: the plaintext's hash would reveal
    equal frames) overwrites the field with its own check; frames carrying its flag bits
    (``skip_flags``) are not compared here."""

    name = "checksum"
    frame_flag = 0
    header_flag = 0

    def __init__(self, skip_flags: int = 0) -> None:
        self.skip_flags = skip_flags

    def encode(self, frame: FrameDraft, data: Buf) -> Buf:
        if not self.skip_flags:          # else a later stage (always applied) writes the field
            frame.checksum = fmt.checksum(data)
        return data

    def decode(self, head: FrameHeader, data: Buf, path: str, pos: int) -> Buf:
        if head.flags & self.skip_flags:
            return data
        if fmt.checksum(data) != head.checksum:
            raise errors.FormatError(path=path, offset=pos, reason="data checksum mismatch")
        return data


class CompressionStage:
    """lz4/zstd per frame; kept only when smaller. The method byte tells the reader."""

    frame_flag = 0
    header_flag = 0

    def __init__(self, method: str | None, level: int | None = None) -> None:
        self.name = method or "none"
        self.method = method
        self.level = level
        self.code = fmt.METHOD_CODES[method]

    def encode(self, frame: FrameDraft, data: Buf) -> Buf:
        if self.method is None:
            return data
        packed = compression.compress(data, self.method, self.level)  # type: ignore[arg-type]
        if len(packed) >= frame.length:
            return data
        frame.method = self.code
        frame.owned = True          # a new buffer of the pipeline's own: later stages may work in place
        return packed

    def decode(self, head: FrameHeader, data: Buf, path: str, pos: int) -> Buf:
        if head.method == fmt.METHOD_NONE:
            return data
        return compression.decompress(data, head.method, head.length, path, pos)  # type: ignore[arg-type]


class Codec:
    """An ordered pipeline of stages; immutable, thread-safe if its stages are."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = tuple(stages)
        self.reverse = tuple(reversed(self.stages))
        self.frame_flags = functools.reduce(int.__or__, (s.frame_flag for s in self.stages), 0)
        self.header_flags = functools.reduce(int.__or__, (s.header_flag for s in self.stages), 0)
        self.uncompressed = self   # set by pipeline(): the same stages with compression off
        # frame flags whose stage put xxh3(stored payload) in the header's checksum field already
        self.checksum_flags = functools.reduce(int.__or__, (getattr(s, "skip_flags", 0) for s in self.stages), 0)
        self.decodes_in_place = any(getattr(s, "decodes_in_place", False) for s in self.stages)
        self.encode_in_pool = any(getattr(s, "encode_in_pool", False) for s in self.stages)

    def encode_data(self, offset: int, data: bytes | memoryview, owned: bool = False) -> EncodedFrame:
        """Run every stage over one data frame and pack its header. Pure and thread-safe.

        ``owned``: the caller gives ``data``'s buffer up (it is not read again before
        the frame is written): a stage may overwrite it in place."""
        length = len(data)
        if offset < 0 or not 0 < length <= fmt.MAX_FRAME_LENGTH:
            raise errors.UsageError(reason=f"data frame at {offset}: length {length} outside 1..{fmt.MAX_FRAME_LENGTH}")
        frame = FrameDraft(offset, length, owned)
        payload: Buf = data
        for stage in self.stages:
            payload = stage.encode(frame, payload)
        header = fmt.pack_frame(fmt.KIND_DATA, frame.method, offset, length, len(payload) + len(frame.tail),
                                frame.checksum, frame.flags)
        if frame.flags & self.checksum_flags:
            stored_checksum = frame.checksum
        else:
            stored_checksum = fmt.checksum(payload) if frame.method or frame.flags else b""
        return EncodedFrame("data", offset, length, header, payload, stored_checksum, frame.tail)  # type: ignore[arg-type]

    def encode_zero(self, offset: int, length: int) -> EncodedFrame:
        if offset < 0 or length <= 0:
            raise errors.UsageError(reason=f"zero frame at {offset}: length {length} must be positive")
        header = fmt.pack_frame(fmt.KIND_ZERO, fmt.METHOD_NONE, offset, length, 0, fmt.NO_CHECKSUM)
        return EncodedFrame("zero", offset, length, header, b"")

    def decode(self, head: FrameHeader, stored: Buf, path: str, pos: int) -> Buf:
        """The verified disk bytes of a data frame from its stored payload.

        A stage that can check but not undo itself (encryption without the key: verify
        checks the ciphertext's checksum) returns None: the frame stays opaque (None)."""
        data: Buf | None = stored
        for stage in self.reverse:
            data = stage.decode(head, data, path, pos)  # type: ignore[arg-type]
            if data is None:
                return None  # type: ignore[return-value]
        return data  # type: ignore[return-value]

    def stored_checksum(self, head: FrameHeader, stored: Buf) -> bytes:
        """The chained-digest part of a payload that is not the disk bytes themselves.

        A frame whose stage keeps xxh3(stored) in the header (encryption) reuses that
        field: the stage's decode compares it with the payload."""
        if head.flags & self.checksum_flags:
            return head.checksum
        return fmt.checksum(stored) if head.method or head.flags else b""


def pipeline(method: str | None, level: int | None = None, extra: tuple[Stage, ...] = ()) -> Codec:
    """The writer's codec: checksum, compression ``method`` at ``level``, then ``extra`` stages."""
    return _pipeline(method, level, extra)


@functools.lru_cache(maxsize=64)
def _pipeline(method: str | None, level: int | None, extra: tuple[Stage, ...]) -> Codec:
    compression.check_method(method, level)
    skip = functools.reduce(int.__or__, (s.frame_flag for s in extra if getattr(s, "replaces_checksum", False)), 0)
    codec = Codec((ChecksumStage(skip), CompressionStage(method, level), *extra))
    codec.uncompressed = codec if method is None else _pipeline(None, None, extra)
    return codec


def reading(extra: tuple[Stage, ...] = ()) -> Codec:
    """The reader's codec: decodes any compression method, plus ``extra`` stages."""
    return pipeline(None, None, extra)
