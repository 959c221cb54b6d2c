"""Read one stream: random access through the index trailer, or sequentially from a pipe.

Every path that returns disk bytes has verified them against the frame's
checksum first; any damage raises :class:`virtnbd.errors.FormatError` naming
the file and the file offset where it was found.
"""
from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Any, BinaryIO, cast

import xxhash

from virtnbd import allocator, errors
from virtnbd.stream import codec
from virtnbd.stream import format as fmt
from virtnbd.stream.format import FrameRef, StreamMeta, StreamTotals

INDEX_BATCH = 8192


STAGE_SLACK = 64     # bytes a codec stage may add to a frame's payload (read past the last frame of a batch)


class _Source:
    """Exact sequential reads with the offset tracked, optional whole-file hashing.

    With ``fd`` (a seekable file) reads are ``os.pread`` at the tracked offset:
    no buffer copy, and random reads elsewhere never move it. Without, reads go
    through ``f`` (pipes), looping over short reads.
    """

    def __init__(self, f: BinaryIO, path: str, fd: int | None = None) -> None:
        self.f = f
        self.path = path
        self.fd = fd
        self.pos = 0
        self.hash: xxhash.xxh3_128 | None = None

    def _read_some(self, n: int) -> bytes:
        if self.fd is not None:
            return os.pread(self.fd, n, self.pos)
        return self.f.read(n)

    def read(self, n: int, what: str) -> bytes:
        try:
            data = self._read_some(n)
            if 0 < len(data) < n:                      # short read: pipe or signal, keep going
                parts = [data]
                got = len(data)
                while got < n:
                    more = (os.pread(self.fd, n - got, self.pos + got) if self.fd is not None
                            else self.f.read(n - got))
                    if not more:
                        break
                    parts.append(more)
                    got += len(more)
                data = b"".join(parts)
        except OSError as err:
            raise errors.FormatError(path=self.path, offset=self.pos, reason=err.strerror or str(err)) from err
        if len(data) != n:
            raise errors.FormatError(path=self.path, offset=self.pos + len(data), reason=f"truncated {what}")
        if self.hash is not None:
            self.hash.update(data)
        self.pos += n
        return data

    def readinto(self, view: memoryview, what: str) -> memoryview:
        """Fill ``view`` exactly (loops over short reads from pipes)."""
        done = 0
        try:
            while done < len(view):
                got = (os.preadv(self.fd, [view[done:]], self.pos + done) if self.fd is not None
                       else self.f.readinto(view[done:]))  # type: ignore[attr-defined]
                if not got:
                    break
                done += got
        except OSError as err:
            raise errors.FormatError(path=self.path, offset=self.pos + done, reason=err.strerror or str(err)) from err
        if done != len(view):
            raise errors.FormatError(path=self.path, offset=self.pos + done, reason=f"truncated {what}")
        if self.hash is not None:
            self.hash.update(view)
        self.pos += done
        return view

    def seek(self, pos: int) -> None:
        if self.fd is None:
            try:
                self.f.seek(pos)
            except OSError as err:
                raise errors.FormatError(path=self.path, offset=pos, reason=err.strerror or str(err)) from err
        self.pos = pos

    def at_end(self) -> bool:
        try:
            return not self._read_some(1)
        except OSError as err:
            raise errors.FormatError(path=self.path, offset=self.pos, reason=err.strerror or str(err)) from err


class ByFrames:
    """Batch access for readers whose index is a list of frames (virtnbdbackup streams, raw images):
    ``index_batches`` chunks ``frames()``, ``read_batch`` reads frame by frame."""

    def frames(self) -> list[FrameRef]:
        raise NotImplementedError

    def read(self, ref: FrameRef) -> bytes:
        raise NotImplementedError

    def index_batches(self, batch: int = 4096, raw_kind: bool = False) -> Iterator[list[tuple[Any, int, int, int]]]:
        refs = self.frames()
        for first in range(0, len(refs), batch):
            yield [(fmt.KIND_CODES[r.kind] if raw_kind else r.kind == "data", r.offset, r.length, r.pos)
                   for r in refs[first:first + batch]]

    def read_batch(self, frames: Sequence[tuple[int, int, int]]) -> list[bytes | bytearray | memoryview]:
        return [self.read(FrameRef("data", offset, length, pos)) for pos, offset, length in frames]

    def read_into(self, ref: FrameRef, view: memoryview) -> None:
        view[:] = self.read(ref)


class _IndexDigest:
    """The index a sequential pass expects, kept as one digest per 128 KiB of entries (not per frame)."""

    CHUNK = 4096 * fmt.INDEX_ENTRY.size

    def __init__(self) -> None:
        self.count = 0
        self.digests: list[bytes] = []
        self._pending = bytearray()

    def add(self, kind: int, offset: int, length: int, pos: int) -> None:
        self._pending += fmt.INDEX_ENTRY.pack(kind, offset, length, pos)
        self.count += 1
        if len(self._pending) >= self.CHUNK:
            self.finish()

    def finish(self) -> None:
        if self._pending:
            self.digests.append(fmt.checksum(self._pending))
            self._pending = bytearray()


class StreamReader:
    """Reader of one virtnbd stream; a context manager.

    ``frames``/``read``/``read_range`` need a seekable file; ``iter_frames``
    and ``verify`` also work on a pipe (once, from the start).
    """

    def __init__(self, f: BinaryIO, path: str = "<stream>", owns: bool = False,
                 stages: tuple[codec.Stage, ...] = ()) -> None:
        self.path = path
        self.codec = codec.reading(stages)
        self._f = f
        self._owns = owns
        try:
            self._seekable = f.seekable()
        except (OSError, ValueError):
            self._seekable = False
        try:
            self._fd: int | None = f.fileno() if self._seekable else None
        except (OSError, ValueError, AttributeError):
            self._fd = None
        self._src = _Source(f, path, self._fd)
        if self._seekable:
            self._src.seek(0)
        self._consumed = False
        self._src.hash = xxhash.xxh3_128()
        prefix = self._src.read(fmt.HEADER.size, "header")
        meta_len = fmt.parse_header_prefix(prefix, path, self.codec.header_flags)
        head = prefix + self._src.read(meta_len, "header metadata")
        self._header_check = self._src.read(fmt.HEADER_CHECK_SIZE, "header checksum")
        self.meta: StreamMeta = fmt.decode_meta(head, self._header_check, path)
        self._bind(stages, fmt.HEADER.unpack(prefix[:fmt.HEADER.size])[2])
        self._data_start = self._src.pos
        self._frames: list[FrameRef] | None = None
        self._starts: list[int] = []
        self._totals: StreamTotals | None = None

    def _bind(self, stages: tuple[codec.Stage, ...], flags: int) -> None:
        """Stages keyed per stream (encryption) bind to this header; a stream must carry the header
        flags of every extra stage (an encrypted set holds no plaintext stream)."""
        missing = self.codec.header_flags & ~flags
        if missing:
            raise errors.FormatError(path=self.path, offset=10,
                                     reason=f"stream lacks header flags {missing:#x} of the set (not encrypted?)")
        bound = tuple(s.bind(self.meta, self.path) if hasattr(s, "bind") else s for s in stages)
        if bound != stages:
            self.codec = codec.reading(bound)

    def __enter__(self) -> StreamReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._owns:
            self._f.close()

    # -- random access -------------------------------------------------------------

    def _need_seek(self) -> None:
        if not self._seekable:
            raise errors.UsageError(reason=f"{self.path}: random access needs a seekable file, not a pipe")

    def _file_size(self) -> int:
        try:
            if self._fd is not None:
                return os.fstat(self._fd).st_size
            pos = self._f.tell()
            size = self._f.seek(0, os.SEEK_END)
            self._f.seek(pos)
            return size
        except OSError as err:
            raise errors.FormatError(path=self.path, offset=0, reason=err.strerror or str(err)) from err

    def _pread(self, pos: int, n: int, what: str, short_ok: bool = False) -> bytes:
        """Read exactly ``n`` bytes at ``pos`` without moving the sequential position (``short_ok``:
        up to ``n``, fewer at the end of the file)."""
        try:
            if self._fd is not None:
                data = os.pread(self._fd, n, pos)
                while len(data) < n:
                    more = os.pread(self._fd, n - len(data), pos + len(data))
                    if not more:
                        break
                    data += more
            elif hasattr(self._f, "pread"):            # object storage: one thread-safe ranged read
                data = self._f.pread(n, pos)
            else:
                keep = self._f.tell()
                self._f.seek(pos)
                data = self._f.read(n)
                self._f.seek(keep)
        except OSError as err:
            raise errors.FormatError(path=self.path, offset=pos, reason=err.strerror or str(err)) from err
        if len(data) != n and not short_ok:
            raise errors.FormatError(path=self.path, offset=pos + len(data), reason=f"truncated {what}")
        return data

    def frames(self) -> list[FrameRef]:
        """All data and zero frames in offset order, from the index trailer."""
        if self._frames is None:
            self._frames = self._load_index()
            self._starts = [ref.offset for ref in self._frames]
        return list(self._frames)

    def _load_index(self) -> list[FrameRef]:
        names = fmt.KIND_NAMES
        return [FrameRef(names[kind], offset, length, pos)
                for batch in self.index_batches(INDEX_BATCH, raw_kind=True) for kind, offset, length, pos in batch]

    def _index_location(self) -> tuple[int, int, int]:
        """Check the footer, the end frame and the index checksum (reading the index in
        bounded chunks); return ``(index_pos, count, end_pos)``."""
        self._need_seek()
        size = self._file_size()
        min_size = self._data_start + fmt.FRAME.size + fmt.END_PAYLOAD.size + fmt.FOOTER.size
        if size < min_size:
            raise errors.FormatError(path=self.path, offset=size, reason="truncated stream (no index trailer)")
        footer_pos = size - fmt.FOOTER.size
        footer = self._pread(footer_pos, fmt.FOOTER.size, "index footer")
        end_pos, index_pos, count, index_check, magic = fmt.FOOTER.unpack(footer)
        if magic != fmt.INDEX_MAGIC:
            raise errors.FormatError(path=self.path, offset=footer_pos + 40, reason="truncated stream (no index magic)")
        if (index_pos + count * fmt.INDEX_ENTRY.size != footer_pos
                or end_pos + fmt.FRAME.size + fmt.END_PAYLOAD.size != index_pos or end_pos < self._data_start):
            raise errors.FormatError(path=self.path, offset=footer_pos, reason="index footer positions inconsistent")
        end = fmt.unpack_frame(self._pread(end_pos, fmt.FRAME.size, "end frame"), self.path, end_pos)
        if end.kind != fmt.KIND_END:
            raise errors.FormatError(path=self.path, offset=end_pos, reason="index footer does not point at end frame")
        hasher = xxhash.xxh3_128(end.checksum)
        step = INDEX_BATCH * fmt.INDEX_ENTRY.size
        for at in range(index_pos, footer_pos, step):
            hasher.update(self._pread(at, min(step, footer_pos - at), "index"))
        hasher.update(footer[:24])
        if hasher.digest() != index_check:
            raise errors.FormatError(path=self.path, offset=index_pos, reason="index checksum mismatch")
        return index_pos, count, end_pos

    def index_entries(self) -> tuple[bytes, int, int]:
        """The raw index entries (``count x INDEX_ENTRY``), checksum-verified, with the index and end
        frame positions; for readers that keep the index compactly instead of as FrameRefs."""
        index_pos, count, end_pos = self._index_location()
        return self._pread(index_pos, count * fmt.INDEX_ENTRY.size, "index"), index_pos, end_pos

    def index_batches(self, batch: int = 4096, raw_kind: bool = False) -> Iterator[list[tuple[Any, int, int, int]]]:
        """The index in offset order, ``batch`` entries at a time, each checked as it is read:
        ``(is_data, offset, length, pos)`` (``(kind code, ...)`` with ``raw_kind``).

        The whole index's checksum is checked before the first batch; memory is one batch.
        """
        index_pos, count, end_pos = self._index_location()
        size, esize, data = self.meta.virtual_size, fmt.INDEX_ENTRY.size, fmt.KIND_DATA
        totals = {True: 0, False: 0}              # data / zero bytes, checked against the end frame
        next_offset, next_pos = 0, self._data_start
        for first in range(0, count, batch):
            raw = self._pread(index_pos + first * esize, min(batch, count - first) * esize, "index")
            out: list[tuple[Any, int, int, int]] = []
            for kind, offset, length, pos in fmt.INDEX_ENTRY.iter_unpack(raw):
                if (kind not in fmt.KIND_NAMES or length <= 0 or offset < next_offset or pos < next_pos
                        or offset + length > size or pos + fmt.FRAME.size > end_pos):
                    where = index_pos + (first + len(out)) * esize
                    raise errors.FormatError(path=self.path, offset=where, reason="invalid index entry")
                out.append((kind if raw_kind else kind == data, offset, length, pos))
                next_offset, next_pos = offset + length, pos + fmt.FRAME.size
                totals[kind == data] += length
            yield out
        self._check_end_totals(count, totals[True], totals[False], end_pos)

    def _check_end_totals(self, count: int, data: int, zero: int, end_pos: int) -> None:
        """The end frame's totals agree with the index (random access reads no other copy of them)."""
        payload = self._pread(end_pos + fmt.FRAME.size, fmt.END_PAYLOAD.size, "end frame")
        stored = end_pos - self._data_start - count * fmt.FRAME.size
        if fmt.END_PAYLOAD.unpack(payload) != (count, data, zero, stored):
            raise errors.FormatError(path=self.path, offset=end_pos + fmt.FRAME.size,
                                     reason="end frame totals do not match the index")

    def read_batch(self, frames: Sequence[tuple[int, int, int]]) -> list[bytes | bytearray | memoryview]:
        """The verified disk bytes of several data frames ``(pos, offset, length)`` that lie close
        together in the file, read with one ``pread`` (from the first header to the end of the last
        frame at most: frames between them are read and skipped)."""
        return [data for _, _, data in self._batch(frames)[1]]

    def read_stored_batch(self, frames: Sequence[tuple[int, int, int]], into: bytearray | None = None
                          ) -> tuple[memoryview, list[tuple[int, fmt.FrameHeader, Any]]]:
        """:meth:`read_batch` for copying frames as they are stored into another stream: the span
        read, and per frame its start in the span (header, then ``head.stored`` payload bytes), its
        header and its verified disk bytes (checked once, here). ``into``: a buffer to read into
        when it is large enough (:meth:`batch_span`; the caller recycles it: no fresh pages)."""
        return self._batch(frames, into)

    @staticmethod
    def batch_span(frames: Sequence[tuple[int, int, int]]) -> int:
        """Bytes :meth:`read_stored_batch` reads for ``frames`` (the last one's tag room included)."""
        last_pos, _, last_len = frames[-1]
        return last_pos + fmt.FRAME.size + last_len + STAGE_SLACK - frames[0][0]   # AEAD tag: 16

    def _batch(self, frames: Sequence[tuple[int, int, int]], into: bytearray | None = None
               ) -> tuple[memoryview, list[tuple[int, fmt.FrameHeader, Any]]]:
        self._need_seek()
        first = frames[0][0]
        span = self.batch_span(frames)
        given = into if into is not None and len(into) >= span else None      # the caller's buffer, if it fits
        try:
            if self._fd is None:
                view = memoryview(self._pread(first, span, "frames", short_ok=True))   # the span may pass the
                # end of the file (compressed last frame + slack): short, as os.pread below; payloads checked
            elif given is not None or self.codec.decodes_in_place:
                view = memoryview(given if given is not None else allocator.uninitialized(span))[:span]
                view = view[:os.preadv(self._fd, [view], first)]   # a stage may decode into it (no copy)
            else:
                view = memoryview(os.pread(self._fd, span, first))
        except OSError as err:
            raise errors.FormatError(path=self.path, offset=first, reason=err.strerror or str(err)) from err
        out: list[tuple[int, fmt.FrameHeader, Any]] = []
        decode, flags, size = self.codec.decode, self.codec.frame_flags, fmt.FRAME.size
        decoded_to = first      # a frame asked for twice is decoded again from its bytes, not from the result
        for pos, offset, length in frames:
            rel = pos - first
            head = fmt.unpack_frame(bytes(view[rel:rel + size]), self.path, pos, flags)
            if head.kind != fmt.KIND_DATA or head.offset != offset or head.length != length:
                raise errors.FormatError(path=self.path, offset=pos, reason="frame header does not match the index")
            payload = view[rel + size:rel + size + head.stored]
            if len(payload) != head.stored:
                raise errors.FormatError(path=self.path, offset=pos + size + len(payload),
                                         reason="truncated frame payload")
            if pos < decoded_to:
                payload = memoryview(self._pread(pos + size, head.stored, "frame payload"))
            decoded_to = max(decoded_to, pos + size + head.stored)
            out.append((rel, head, decode(head, payload, self.path, pos)))
        return view, out

    def read(self, ref: FrameRef) -> bytes:
        """The disk bytes of one frame, checksum-verified (zeros for a zero frame)."""
        head = self._head(ref)
        if head.kind == fmt.KIND_ZERO:
            return bytes(ref.length)
        stored = self._pread(ref.pos + fmt.FRAME.size, head.stored, "frame payload")
        return cast(bytes, self.codec.decode(head, stored, self.path, ref.pos))

    def read_into(self, ref: FrameRef, view: memoryview) -> None:
        """Fill ``view`` (``ref.length`` bytes) with a data frame's verified disk bytes.

        In a stream written without compression or codec stages the frame's header and payload
        are read straight into ``view`` by one ``preadv`` (no copy) and checked there; a frame
        stored otherwise (or a file without a descriptor) is decoded and copied. On an error
        ``view`` may hold unchecked bytes: the caller must not use them."""
        if self._fd is None or self.meta.compression is not None or self.codec.frame_flags:
            view[:] = self.read(ref)
            return
        raw = bytearray(fmt.FRAME.size)
        try:
            got = os.preadv(self._fd, [raw, view], ref.pos)
        except OSError as err:
            raise errors.FormatError(path=self.path, offset=ref.pos, reason=err.strerror or str(err)) from err
        head = self._checked_head(bytes(raw[:got]), ref)
        if head.method != fmt.METHOD_NONE or head.kind != fmt.KIND_DATA:
            view[:] = self.read(ref)
            return
        if got != fmt.FRAME.size + ref.length:
            raise errors.FormatError(path=self.path, offset=ref.pos + got, reason="truncated frame payload")
        data = self.codec.decode(head, view, self.path, ref.pos)
        if data is not view:
            view[:] = cast(bytes, data)

    def _head(self, ref: FrameRef) -> fmt.FrameHeader:
        self._need_seek()
        return self._checked_head(self._pread(ref.pos, fmt.FRAME.size, "frame header"), ref)

    def _checked_head(self, raw: bytes, ref: FrameRef) -> fmt.FrameHeader:
        """The parsed header read at ``ref.pos``; it must describe the frame the index lists there."""
        head = fmt.unpack_frame(raw, self.path, ref.pos, self.codec.frame_flags)
        if fmt.KIND_NAMES.get(head.kind) != ref.kind or head.offset != ref.offset or head.length != ref.length:
            raise errors.FormatError(path=self.path, offset=ref.pos, reason="frame header does not match the index")
        return head

    def read_stored(self, ref: FrameRef) -> tuple[fmt.FrameHeader, bytes, bytes]:
        """A data frame's header, its payload as stored and its verified disk bytes (a stored frame
        is copied unchanged into another stream by consolidation, after this check)."""
        head = self._head(ref)
        if head.kind != fmt.KIND_DATA:
            raise errors.FormatError(path=self.path, offset=ref.pos, reason="not a data frame")
        stored = self._pread(ref.pos + fmt.FRAME.size, head.stored, "frame payload")
        return head, stored, cast(bytes, self.codec.decode(head, stored, self.path, ref.pos))

    def read_range(self, offset: int, length: int) -> bytes:
        """Bytes ``offset .. offset+length`` of the disk as this stream holds them.

        Uses the index (no scan). Ranges no frame covers read as zeros: for an
        inc/diff stream use :meth:`frames_in` to see what the stream covers.
        """
        if offset < 0 or length < 0 or offset + length > self.meta.virtual_size:
            raise errors.UsageError(reason=f"{self.path}: range {offset}+{length} outside the disk "
                                           f"(0..{self.meta.virtual_size})")
        out = bytearray(length)
        for ref in self.frames_in(offset, length):
            if ref.kind != "data":
                continue
            data = self.read(ref)
            lo, hi = max(offset, ref.offset), min(offset + length, ref.offset + ref.length)
            out[lo - offset:hi - offset] = memoryview(data)[lo - ref.offset:hi - ref.offset]
        return bytes(out)

    def frames_in(self, offset: int, length: int) -> list[FrameRef]:
        """Frames overlapping ``offset .. offset+length`` (binary search on the index)."""
        frames = self.frames() if self._frames is None else self._frames
        return overlapping(frames, self._starts, offset, length)

    # -- sequential ---------------------------------------------------------------

    def iter_frames(self, reuse_buffer: bool = False) -> Iterator[tuple[FrameRef, bytes | None]]:
        """Every frame in file order with its verified bytes (None for zero frames).

        ``reuse_buffer=True`` (an addition to the contract) yields uncompressed
        frames as memoryviews into one reused buffer, valid only until the next
        iteration step: no allocation per frame, for consumers that write the
        data out at once. Works on a pipe. Data is yielded frame by frame, each one checksum
        verified; the chained digest, totals and index are checked when the
        end is reached, so a consumer must treat the stream as good only once
        the iteration finished without error. ``totals.file_digest`` is set
        by :meth:`verify` and by reads from a pipe (empty otherwise).
        """
        return self._iter(reuse_buffer, hash_file=False)

    def _iter(self, reuse_buffer: bool, hash_file: bool) -> Iterator[tuple[FrameRef, bytes | None]]:
        if self._seekable:
            self._src.seek(0)
            self._src.hash = xxhash.xxh3_128() if hash_file else None
            self._src.read(self._data_start, "header")
        elif self._consumed:
            raise errors.UsageError(reason=f"{self.path}: a pipe can be read only once")
        self._consumed = True
        yield from self._scan(reuse_buffer)

    def _scan(self, reuse_buffer: bool = False) -> Iterator[tuple[FrameRef, bytes | None]]:  # noqa: PLR0914
        src = self._src
        decode, stored_checksum, flags = self.codec.decode, self.codec.stored_checksum, self.codec.frame_flags
        buf = bytearray()
        chain = self._header_check
        index = _IndexDigest()
        data_bytes = zero_bytes = payload_bytes = 0
        next_offset = 0
        while True:
            pos = src.pos
            head = fmt.unpack_frame(src.read(fmt.FRAME.size, "frame header"), self.path, pos, flags)
            if head.kind == fmt.KIND_END:
                break
            if head.offset < next_offset or head.offset + head.length > self.meta.virtual_size:
                raise errors.FormatError(path=self.path, offset=pos, reason="frame out of order or beyond disk size")
            next_offset = head.offset + head.length
            ref = FrameRef(fmt.KIND_NAMES[head.kind], head.offset, head.length, pos)
            index.add(head.kind, head.offset, head.length, pos)
            if head.kind == fmt.KIND_DATA:
                data_bytes += head.length
                payload_bytes += head.stored
                if not reuse_buffer:
                    stored: bytes | memoryview = src.read(head.stored, "frame payload")
                else:
                    if len(buf) < head.stored:
                        buf = bytearray(head.stored)   # never resized in place: views may still exist
                    stored = src.readinto(memoryview(buf)[:head.stored], "frame payload")
                chain = fmt.chain_step(chain, head.raw + stored_checksum(head, stored))
                yield ref, cast(bytes, decode(head, stored, self.path, pos))
            else:
                chain = fmt.chain_step(chain, head.raw)
                zero_bytes += head.length
                yield ref, None
        end_pos = pos
        payload = src.read(fmt.END_PAYLOAD.size, "end frame")
        digest = fmt.chain_step(chain, payload)
        if digest != head.checksum:
            raise errors.FormatError(path=self.path, offset=end_pos, reason="chained digest mismatch")
        if fmt.END_PAYLOAD.unpack(payload) != (index.count, data_bytes, zero_bytes, payload_bytes):
            raise errors.FormatError(path=self.path, offset=end_pos, reason="end frame totals do not match frames")
        self._check_trailer(src, index, end_pos, digest)
        hash_ = src.hash
        self._totals = StreamTotals(index.count, data_bytes, zero_bytes, src.pos, digest.hex(),
                                    hash_.hexdigest() if hash_ is not None else "")

    def _check_trailer(self, src: _Source, index: _IndexDigest, end_pos: int, digest: bytes) -> None:
        index_pos = src.pos
        hasher = xxhash.xxh3_128(digest)
        index.finish()
        left = index.count * fmt.INDEX_ENTRY.size
        for i, want in enumerate(index.digests):
            entries = src.read(min(_IndexDigest.CHUNK, left), "index")
            left -= len(entries)
            hasher.update(entries)
            if fmt.checksum(entries) != want:
                raise errors.FormatError(path=self.path, offset=index_pos + i * _IndexDigest.CHUNK,
                                         reason="index does not match frames")
        footer_pos = src.pos
        footer = src.read(fmt.FOOTER.size, "index footer")
        counts = fmt.FOOTER.pack(end_pos, index_pos, index.count, fmt.NO_CHECKSUM, fmt.INDEX_MAGIC)
        hasher.update(counts[:24])
        check = hasher.digest()
        if footer != counts[:24] + check + fmt.INDEX_MAGIC:
            raise errors.FormatError(path=self.path, offset=footer_pos, reason="index footer mismatch")
        if not src.at_end():
            raise errors.FormatError(path=self.path, offset=src.pos, reason="trailing bytes after index footer")

    @property
    def totals(self) -> StreamTotals | None:
        """Totals of the last complete sequential pass (iter_frames/verify), else None."""
        return self._totals

    def verify(self) -> StreamTotals:
        """Read the whole stream and check everything; return its totals."""
        for _ in self._iter(reuse_buffer=True, hash_file=True):
            pass
        if self._seekable:
            self._frames = None
            for _ in self.index_batches(INDEX_BATCH):   # entry checks, one batch in memory at a time
                pass
        if self._totals is None:  # pragma: no cover - _scan always sets it or raises
            raise errors.FormatError(path=self.path, offset=0, reason="stream not verified")
        return self._totals


def overlapping(frames: Sequence[FrameRef], starts: Sequence[int], offset: int, length: int) -> list[FrameRef]:
    """The frames (sorted by offset, ``starts`` their offsets) overlapping ``offset .. offset+length``."""
    i = max(bisect.bisect_right(starts, offset) - 1, 0)
    out = []
    while i < len(frames) and frames[i].offset < offset + length:
        if frames[i].offset + frames[i].length > offset:
            out.append(frames[i])
        i += 1
    return out
