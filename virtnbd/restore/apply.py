"""Write a chain's windows into a target: every byte once, several requests in flight.

The planner (:mod:`virtnbd.restore.plan`) yields bounded windows; here the data
pieces of one window are grouped by file and position into *batches*: frames of
one file lying close together are read with one ``pread`` and checksum-verified
(``read_batch`` of the stream reader; one ``read`` per frame for readers without
it), then their slices are written by the same worker thread. One
:class:`Engine` (``workers`` threads, ``2 * workers`` batches and
``MEMORY_BUDGET`` bytes of payload + decoded data in flight) is shared by every
disk of a restore, so parallel disks stay within one budget. Zero ranges go to
``target.zero`` (a fresh target leaves them as holes). A shared ``stop`` event
ends a disk's loop between batches (another disk failed).
"""
from __future__ import annotations

import functools
import itertools
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from virtnbd import errors
from virtnbd.restore.plan import Piece, Plan, Window
from virtnbd.restore.targets import Target
from virtnbd.stream.format import FRAME, FrameRef

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
MEMORY_BUDGET = 64 << 20
BATCH_BYTES = 1 << 20          # decoded bytes of one batch (a larger single frame is a batch alone)
BATCH_GAP = 64 << 10           # bytes of other frames a batch may read and skip between two of its frames

FrameJob = tuple[int, int, int, list[tuple[int, int]]]     # pos, frame offset, frame length, (start, end) pieces


class Stopped(errors.Interrupted):
    """Another disk of the same restore failed: this one stopped without committing."""

    template = "{reason}"


class ByteBudget:
    """Blocks ``take`` until ``n`` bytes fit; a request larger than the budget waits until it runs alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._cond = threading.Condition()

    def take(self, n: int) -> None:
        with self._cond:
            while self.used and self.used + n > self.limit:
                self._cond.wait()
            self.used += n

    def give(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


class FrameSource(Protocol):
    def read(self, ref: FrameRef) -> bytes: ...  # type: ignore[misc]


@dataclass(frozen=True)
class ApplyResult:
    data_bytes: int       # bytes the plan writes as data
    zero_bytes: int       # bytes left as zeroes
    frames_read: int


class Engine:
    """Worker threads and the in-flight limits shared by every disk of one restore."""

    def __init__(self, workers: int = 4, memory: int = MEMORY_BUDGET) -> None:
        self.workers = max(1, workers)
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="restore")
        self.slots = threading.BoundedSemaphore(2 * self.workers)
        self.budget = ByteBudget(memory)
        self.stop = threading.Event()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.pool.shutdown(wait=True)


def _read_frames(source: Any, frames: Sequence[FrameJob]) -> Sequence[bytes | memoryview]:
    read_batch = getattr(source, "read_batch", None)
    if read_batch is not None:
        return read_batch([(pos, off, ln) for pos, off, ln, _ in frames])  # type: ignore[no-any-return]
    return [source.read(FrameRef("data", off, ln, pos)) for pos, off, ln, _ in frames]


def _write_batch(source: Any, frames: Sequence[FrameJob], target: Target) -> int:
    """One batch's pieces in one ``write_many`` call (one count and lock per batch, not per frame)."""
    return target.write_many([(start, memoryview(data)[start - off:end - off])
                              for (_, off, _, pieces), data in zip(frames, _read_frames(source, frames), strict=True)
                              for start, end in pieces])


def _by_file(data: Sequence[Piece]) -> Iterable[Piece]:
    """Pieces in (layer, file position) order. ``data`` is in disk order and a stream file's frames
    are in disk order too (the reader checks it), so bucketing by layer keeps each bucket sorted."""
    buckets: dict[int, list[Piece]] = {}
    for piece in data:
        got = buckets.get(piece[2])
        if got is None:
            buckets[piece[2]] = [piece]
        else:
            got.append(piece)
    if len(buckets) == 1:
        return data
    return itertools.chain.from_iterable(buckets[layer] for layer in sorted(buckets))


def batches(data: Sequence[Piece]) -> list[tuple[int, list[FrameJob]]]:
    """The window's data pieces as ``(layer, frames)`` batches: same file, close together, bounded."""
    out: list[tuple[int, list[FrameJob]]] = []
    frames: list[FrameJob] = []
    layer = -1
    first_pos = size = 0
    for start, end, lay, entry in _by_file(data):
        pos, off, ln = entry[2], entry[3], entry[4]
        if frames and lay == layer and frames[-1][0] == pos:
            frames[-1][3].append((start, end))
            continue
        prev = frames[-1] if frames else None
        if (prev is None or lay != layer or pos < prev[0] or pos - (prev[0] + FRAME.size + prev[2]) > BATCH_GAP
                or size + ln > BATCH_BYTES or pos + FRAME.size + ln - first_pos > BATCH_BYTES + BATCH_GAP):
            if frames:
                out.append((layer, frames))
            frames, layer, first_pos, size = [], lay, pos, 0
        frames.append((pos, off, ln, [(start, end)]))
        size += ln
    if frames:
        out.append((layer, frames))
    return out


class _Flight:
    """One disk's batches in flight on the shared engine; the first failure is kept."""

    def __init__(self, engine: Engine, progress: Progress | None) -> None:
        self.engine = engine
        self.progress = progress
        self.failure: list[BaseException] = []
        self.cond = threading.Condition()
        self.pending = 0
        self.frames = 0

    def _done(self, fut: Future[int], cost: int) -> None:
        self.engine.budget.give(cost)
        self.engine.slots.release()
        err = fut.exception()
        if err is None and self.progress:
            self.progress(fut.result())
        with self.cond:
            if err is not None:
                self.failure.append(err)
            self.pending -= 1
            self.cond.notify_all()

    def submit(self, source: Any, frames: list[FrameJob], target: Target) -> bool:
        eng = self.engine
        span = frames[-1][0] + FRAME.size + frames[-1][2] - frames[0][0]
        cost = span + sum(f[2] for f in frames)
        eng.slots.acquire()
        eng.budget.take(cost)
        if self.failure or eng.stop.is_set():
            eng.budget.give(cost)
            eng.slots.release()
            return False
        self.frames += len(frames)
        with self.cond:
            self.pending += 1
        fut = eng.pool.submit(_write_batch, source, frames, target)
        fut.add_done_callback(functools.partial(self._done, cost=cost))
        return True

    def wait_idle(self) -> None:
        with self.cond:
            while self.pending:
                self.cond.wait()


def apply_windows(wins: Iterable[Window], sources: Sequence[Any], target: Target, engine: Engine,
                  progress: Progress | None = None) -> ApplyResult:
    """Write every window into ``target`` (not committed: the caller commits)."""
    flight = _Flight(engine, progress)
    data_bytes = zero_bytes = 0
    try:
        for win in wins:
            for start, end in win.zeros:
                target.zero(start, end - start)
                zero_bytes += end - start
                if progress:
                    progress(end - start)
            data_bytes += win.data_bytes
            if not all(flight.submit(sources[layer], frames, target) for layer, frames in batches(win.data)):
                break
    finally:
        flight.wait_idle()
    if flight.failure:
        raise flight.failure[0]
    if engine.stop.is_set():
        raise Stopped(reason="stopped: another disk of this restore failed")
    return ApplyResult(data_bytes=data_bytes, zero_bytes=zero_bytes, frames_read=flight.frames)


def apply_plan(plan: Plan, sources: Sequence[Any], target: Target, workers: int = 4,
               progress: Progress | None = None) -> ApplyResult:
    """Write a whole-chain :class:`Plan` (the older interface) through the same engine."""
    zeros = [(e.start, e.end) for e in plan.extents if e.is_zero]
    data: list[Piece] = [(e.start, e.end, e.layer, (e.start, e.end, e.frame.pos, e.frame.offset, e.frame.length, True))
                         for e in plan.extents if e.frame is not None and e.layer is not None]
    with Engine(workers) as engine:
        return apply_windows([Window(0, plan.virtual_size, zeros, data)], sources, target, engine, progress)
