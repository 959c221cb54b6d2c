"""Write a collapsed plan into a target: every byte once, several requests in flight.

Each data frame the plan uses is read and checksum-verified once (by the
stream reader, with ``pread``, so one reader serves all threads); its slices
are written by the same worker thread. At most ``2 * workers`` frames and
at most ``MEMORY_BUDGET`` bytes of frames (payload + decoded) are in memory at
any time, whatever the image size (a single larger frame runs alone). Zero extents go to
``target.zero`` (a fresh target leaves them as holes).
"""
from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from virtnbd.restore.plan import Extent, FrameLike, Plan
from virtnbd.restore.targets import Target

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
MEMORY_BUDGET = 64 << 20


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
    def read(self, ref: FrameLike) -> bytes: ...  # type: ignore[misc]


@dataclass(frozen=True)
class ApplyResult:
    data_bytes: int       # bytes the plan writes as data
    zero_bytes: int       # bytes left as zeroes
    frames_read: int


def _write_group(source: FrameSource, frame: FrameLike, extents: Sequence[Extent], target: Target) -> int:
    data = memoryview(source.read(frame))
    written = 0
    for ext in extents:
        target.write(ext.start, data[ext.skip:ext.skip + ext.length])
        written += ext.length
    return written


def apply_plan(plan: Plan, sources: Sequence[FrameSource], target: Target, workers: int = 4,
               progress: Progress | None = None) -> ApplyResult:
    """Write ``plan`` into ``target`` (not committed: the caller commits)."""
    workers = max(1, workers)
    for ext in plan.extents:
        if ext.is_zero:
            target.zero(ext.start, ext.length)
            if progress:
                progress(ext.length)
    groups = plan.frame_groups()
    slots = threading.BoundedSemaphore(2 * workers)
    budget = ByteBudget(MEMORY_BUDGET)
    failure: list[BaseException] = []
    lock = threading.Lock()

    def done(fut: Future[int], cost: int) -> None:
        budget.give(cost)
        slots.release()
        err = fut.exception()
        if err is not None:
            with lock:
                failure.append(err)
        elif progress:
            progress(fut.result())

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="restore") as pool:
        for layer, frame, extents in groups:
            cost = 2 * frame.length
            slots.acquire()
            budget.take(cost)
            if failure:
                budget.give(cost)
                slots.release()
                break
            fut = pool.submit(_write_group, sources[layer], frame, extents, target)
            fut.add_done_callback(functools.partial(done, cost=cost))
    if failure:
        raise failure[0]
    return ApplyResult(data_bytes=plan.data_bytes, zero_bytes=plan.zero_bytes, frames_read=len(groups))
