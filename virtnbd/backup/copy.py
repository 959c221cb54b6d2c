"""The copy loop of one disk: extents -> NBD reads -> encode in a pool -> StreamWriter.

Reads run ahead of the writer by at most ``memory`` bytes; frames reach the
writer in ascending offset order. Data that reads back as all zeros becomes a
zero frame.
"""
from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass

from virtnbd import errors
from virtnbd.extents import DATA, Extent, split
from virtnbd.nbdsource import NbdSource
from virtnbd.stream.format import EncodedFrame
from virtnbd.stream.writer import StreamWriter, encode_data, encode_zero

_ZEROS: dict[int, bytes] = {}


def _zeros(length: int) -> bytes:
    buf = _ZEROS.get(length)
    if buf is None:
        buf = bytes(length)
        if len(_ZEROS) < 4:
            _ZEROS[length] = buf
    return buf


@dataclass
class CopyStats:
    data_bytes: int = 0         # bytes stored as data frames
    zero_bytes: int = 0         # bytes recorded as zero frames
    read_zero_bytes: int = 0    # read as data but all zeros -> zero frames
    frames: int = 0


def encode(offset: int, data: bytearray, method: str | None, level: int | None) -> EncodedFrame:
    """Data frame, or a zero frame when the data is all zeros."""
    if data == _zeros(len(data)):
        return encode_zero(offset, len(data))
    return encode_data(offset, memoryview(data), method, level)


class _Chain:
    """Future of the encoded frame of one read: read -> pool.submit(encode)."""

    def __init__(self, read: Future[bytearray], pool: Executor, ext: Extent, method: str | None,
                 level: int | None) -> None:
        self.frame: Future[EncodedFrame] = Future()
        self.pool = pool
        self.ext = ext
        self.method = method
        self.level = level
        read.add_done_callback(self._read_done)

    def _read_done(self, read: Future[bytearray]) -> None:
        err = read.exception()
        if err is not None:
            self.frame.set_exception(err)
            return
        try:
            encoded = self.pool.submit(encode, self.ext.offset, read.result(), self.method, self.level)
        except RuntimeError as exc:   # pool shut down: the run is ending
            self.frame.set_exception(exc)
            return
        encoded.add_done_callback(self._encoded)

    def _encoded(self, encoded: Future[EncodedFrame]) -> None:
        err = encoded.exception()
        if err is not None:
            self.frame.set_exception(err)
        else:
            self.frame.set_result(encoded.result())


def copy_disk(source: NbdSource, writer: StreamWriter, extents: Iterable[Extent], pool: Executor, *,
              read_size: int, memory: int, level: int | None = None,
              progress: Callable[[int], None] | None = None,
              cancel: threading.Event | None = None) -> CopyStats:
    """Copy ``extents`` of ``source`` into ``writer``; returns what was written."""
    stats = CopyStats()
    method = writer.meta.compression
    pending: collections.deque[tuple[Extent, _Chain | None]] = collections.deque()
    buffered = 0
    max_buffered = max(memory, read_size)

    def emit() -> None:
        nonlocal buffered
        ext, chain = pending.popleft()
        if chain is None:
            writer.add(encode_zero(ext.offset, ext.length))
            stats.zero_bytes += ext.length
        else:
            frame = chain.frame.result()
            buffered -= ext.length
            writer.add(frame)
            if frame.kind == DATA:
                stats.data_bytes += ext.length
            else:
                stats.zero_bytes += ext.length
                stats.read_zero_bytes += ext.length
        stats.frames += 1
        if progress is not None:
            progress(ext.length)

    for ext in split(extents, read_size):
        if cancel is not None and cancel.is_set():
            raise errors.NbdError(export=source.export, reason="copy cancelled")
        if ext.kind == DATA:
            while buffered + ext.length > max_buffered and pending:
                emit()
            pending.append((ext, _Chain(source.read(ext.offset, ext.length), pool, ext, method, level)))
            buffered += ext.length
        else:
            pending.append((ext, None))
        while pending and (pending[0][1] is None or pending[0][1].frame.done()):
            emit()
    while pending:
        emit()
    return stats

