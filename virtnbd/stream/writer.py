"""Write one stream: header, frames in ascending order, end frame, index trailer.

The writer never seeks: it can write to a pipe. ``encode_data`` is pure and
thread-safe so callers may checksum and compress frames in a worker pool and
hand the results to :meth:`StreamWriter.add` in offset order.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import BinaryIO

import xxhash

from virtnbd import errors
from virtnbd.stream import codec
from virtnbd.stream import format as fmt
from virtnbd.stream.format import EncodedFrame, StreamMeta, StreamTotals

log = logging.getLogger(__name__)

OVERLAP_HASH_MIN = 256 << 10    # payloads from this size get their file digest hashed alongside the write


def encode_data(offset: int, data: bytes | memoryview, method: str | None,
                level: int | None = None) -> EncodedFrame:
    """Checksum and (optionally) compress one data frame. Pure and thread-safe.

    When compression does not make the payload smaller the frame is stored
    uncompressed (method 0), so incompressible data costs nothing extra.
    The stages run in :mod:`virtnbd.stream.codec`.
    """
    return codec.pipeline(method, level).encode_data(offset, data)


def encode_zero(offset: int, length: int) -> EncodedFrame:
    return codec.pipeline(None).encode_zero(offset, length)


class StreamWriter:
    """Context manager writing one stream to ``f`` (file or pipe, never seeked).

    ``level`` (an addition to the contract) is the compression level used by
    :meth:`write_data`; ``None`` picks the method's default. ``stages`` are
    codec stages after compression (e.g. encryption, owned by the backup set);
    :attr:`codec` is the pipeline callers encode frames with for :meth:`add`. On a clean exit
    from the ``with`` block the stream is finished if :meth:`finish` was not
    called; on an exception it is left unfinished (no end frame, no index), so
    a reader rejects it.
    """

    def __init__(self, f: BinaryIO, meta: StreamMeta, path: str = "<stream>", level: int | None = None,
                 stages: tuple[codec.Stage, ...] = ()) -> None:
        self.codec = codec.pipeline(meta.compression, level, stages)
        self.meta = meta
        self.path = path
        self._f = f
        self._file_hash = xxhash.xxh3_128()
        self._file_hashes = bool(getattr(f, "hashes_data", False))   # the file feeds the digest itself
        self._hasher: ThreadPoolExecutor | None = None
        self._pos = 0
        self._next_offset = 0
        self._index = bytearray()
        self._frames = 0
        self._data_bytes = 0
        self._zero_bytes = 0
        self._payload_bytes = 0
        self._totals: StreamTotals | None = None
        header = fmt.encode_header(meta, path, self.codec.header_flags)
        self._chain = header[-fmt.HEADER_CHECK_SIZE:]
        self._write(header)

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is None and self._totals is None:
                self.finish()
        finally:
            self._stop_hasher()

    def _stop_hasher(self) -> None:
        if self._hasher is not None:
            self._hasher.shutdown(wait=True)
            self._hasher = None

    @property
    def position(self) -> int:
        """Bytes written so far."""
        return self._pos

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data``; the whole-file digest of a large payload is computed by a
        helper thread while the write runs (xxhash releases the GIL), and finished before
        returning, so the caller may reuse its buffer at once. A file with
        ``hashes_data`` (copy.WriteBehind) hashes what it writes, in order, itself."""
        if self._file_hashes:
            self._write_all(data)
        elif len(data) < OVERLAP_HASH_MIN:
            self._write_all(data)
            self._file_hash.update(data)
        else:
            if self._hasher is None:
                self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stream-digest")
            pending = self._hasher.submit(self._file_hash.update, data)
            try:
                self._write_all(data)
            finally:
                pending.result()
        self._pos += len(data)

    def _write_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            done = self._f.write(data)
            if done is not None and done < len(data):       # raw (unbuffered) files may write short
                view = memoryview(data)
                while done < len(view):
                    more = self._f.write(view[done:])
                    if not more:
                        raise OSError(f"short write ({done} of {len(view)} bytes)")
                    done += more
        except OSError as err:
            raise errors.StorageError(path=self.path, reason=err.strerror or str(err)) from err

    def add(self, frame: EncodedFrame) -> None:
        """Append an encoded frame; frames must ascend and must not overlap."""
        self._account(frame, self._pos)
        self._write(frame.header)
        if frame.kind == "data":
            self._write(frame.payload)
            if frame.tail:
                self._write(frame.tail)

    def add_stored(self, frames: Sequence[EncodedFrame], data: bytes | memoryview) -> None:
        """Append data frames copied as they are stored in another stream: ``data`` is their headers
        and payloads back to back (what :meth:`add` writes for each), written with one call."""
        if sum(len(f.header) + len(f.payload) + len(f.tail) for f in frames) != len(data):
            raise errors.UsageError(reason=f"{self.path}: stored frames do not match their bytes")
        pos = self._pos
        for frame in frames:
            self._account(frame, pos)
            pos += len(frame.header) + len(frame.payload) + len(frame.tail)
        self._write(data)

    def _account(self, frame: EncodedFrame, pos: int) -> None:
        """Check the order of a frame written at ``pos``; index, chain and count it."""
        if self._totals is not None:
            raise errors.UsageError(reason=f"{self.path}: stream already finished")
        if frame.offset < self._next_offset:
            raise errors.FormatError(path=self.path, offset=pos,
                                     reason=f"frame at disk offset {frame.offset} overlaps or precedes "
                                            f"the previous frame ending at {self._next_offset}")
        end = frame.offset + frame.length
        if end > self.meta.virtual_size:
            raise errors.FormatError(path=self.path, offset=pos,
                                     reason=f"frame {frame.offset}+{frame.length} ends beyond virtual size "
                                            f"{self.meta.virtual_size}")
        self._index += fmt.INDEX_ENTRY.pack(fmt.KIND_CODES[frame.kind], frame.offset, frame.length, pos)
        self._chain = fmt.chain_step(self._chain, frame.chain_record)
        if frame.kind == "data":
            self._data_bytes += frame.length
            self._payload_bytes += len(frame.payload) + len(frame.tail)
        else:
            self._zero_bytes += frame.length
        self._frames += 1
        self._next_offset = end

    def write_data(self, offset: int, data: bytes | memoryview) -> None:
        self.add(self.codec.encode_data(offset, data))

    def write_zero(self, offset: int, length: int) -> None:
        self.add(self.codec.encode_zero(offset, length))

    def finish(self) -> StreamTotals:
        """Write the end frame and the index trailer, flush; return the totals.

        The caller owns the file: fsync/rename it (``fsutil.partial_file``).
        """
        if self._totals is not None:
            return self._totals
        payload = fmt.END_PAYLOAD.pack(self._frames, self._data_bytes, self._zero_bytes, self._payload_bytes)
        digest = fmt.chain_step(self._chain, payload)
        end_pos = self._pos
        self._write(fmt.pack_frame(fmt.KIND_END, fmt.METHOD_NONE, 0, 0, len(payload), digest) + payload)
        index_pos = self._pos
        self._write(self._index)
        counts = fmt.FOOTER.pack(end_pos, index_pos, self._frames, fmt.NO_CHECKSUM, fmt.INDEX_MAGIC)[:24]
        check = xxhash.xxh3_128(digest)                  # = fmt.checksum(digest + index + counts), no copies
        check.update(self._index)
        check.update(counts)
        index_check = check.digest()
        self._write(fmt.FOOTER.pack(end_pos, index_pos, self._frames, index_check, fmt.INDEX_MAGIC))
        self._stop_hasher()
        try:
            self._f.flush()
        except OSError as err:
            raise errors.StorageError(path=self.path, reason=err.strerror or str(err)) from err
        file_digest = self._f.hexdigest() if self._file_hashes else self._file_hash.hexdigest()  # type: ignore[attr-defined]
        self._totals = StreamTotals(
            frames=self._frames, data_bytes=self._data_bytes, zero_bytes=self._zero_bytes,
            stored_bytes=self._pos, digest=digest.hex(), file_digest=file_digest)
        log.debug("%s: finished, %d frames, %d bytes", self.path, self._frames, self._pos)
        return self._totals
