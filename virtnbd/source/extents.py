"""Which ranges of a disk to copy, from NBD block-status metadata contexts.

``base:allocation`` tells data from zeros/holes; for inc/diff the job's
``qemu:dirty-bitmap:backup-<disk>`` tells what changed. A server may answer
each context with a different length, so the coverage of every context is
tracked on its own and the gaps are queried again. The result is a sequence of
ascending, non-overlapping :class:`Extent` runs of kind ``data`` (read it) or
``zero`` (record a zero frame).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from virtnbd import errors

BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1
STATE_ZERO = 2
STATE_DIRTY = 1
MAX_QUERY = 1 << 30          # bytes asked per block-status request
WINDOW = 256 << 20           # extents are computed window by window: bounded memory (a window of
                             # 4 KiB runs holds 64 k of them per context)

DATA = "data"
ZERO = "zero"

# (offset, count) -> {context: [(length, flags), ...] starting at offset}
StatusFn = Callable[[int, int], Mapping[str, Sequence[tuple[int, int]]]]


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    kind: str                # "data" | "zero"

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class Run:
    offset: int
    length: int
    flags: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def _append(runs: list[Run], start: int, end: int, flags: int) -> None:
    if runs and runs[-1].end == start and runs[-1].flags == flags:
        last = runs.pop()
        runs.append(Run(last.offset, end - last.offset, flags))
    else:
        runs.append(Run(start, end - start, flags))


def collect(status: StatusFn, contexts: Sequence[str], start: int, end: int, *,
            max_query: int = MAX_QUERY, export: str = "") -> dict[str, list[Run]]:
    """Runs of every context covering exactly ``[start, end)``."""
    runs: dict[str, list[Run]] = {c: [] for c in contexts}
    covered = dict.fromkeys(contexts, start)
    while (low := min(covered.values())) < end:
        answer = status(low, min(end - low, max_query))
        progressed = False
        for ctx in contexts:
            pos = low
            for length, flags in answer.get(ctx, ()):
                seg_start, seg_end = max(pos, covered[ctx]), min(pos + length, end)
                pos += length
                if seg_end > seg_start and seg_start == covered[ctx]:
                    _append(runs[ctx], seg_start, seg_end, flags)
                    covered[ctx] = seg_end
                    progressed = True
                if pos >= end:
                    break
        if not progressed:
            missing = [c for c in contexts if covered[c] == low]
            raise errors.NbdError(export=export, reason=f"block status at offset {low} made no progress "
                                                        f"for context(s) {', '.join(missing)}")
    return runs


def _boundaries(*lists: Sequence[Run]) -> list[int]:
    points = set()
    for runs in lists:
        for run in runs:
            points.add(run.offset)
            points.add(run.end)
    return sorted(points)


def _flags_at(runs: Sequence[Run], idx: int, pos: int) -> tuple[int, int]:
    """Flags of the run containing ``pos``, scanning forward from ``idx``."""
    while runs[idx].end <= pos:
        idx += 1
    return runs[idx].flags, idx


def classify(runs: Mapping[str, Sequence[Run]], bitmap: str | None) -> Iterator[Extent]:
    """Extents of one window. Without a bitmap every byte is described; with one only dirty bytes."""
    base = runs[BASE_ALLOCATION]
    if bitmap is None:
        for run in base:
            yield Extent(run.offset, run.length, ZERO if run.flags & STATE_ZERO else DATA)
        return
    dirty = runs[bitmap]
    points = _boundaries(base, dirty)
    bi = di = 0
    for lo, hi in zip(points, points[1:], strict=False):
        dflags, di = _flags_at(dirty, di, lo)
        if not dflags & STATE_DIRTY:
            continue
        bflags, bi = _flags_at(base, bi, lo)
        yield Extent(lo, hi - lo, ZERO if bflags & STATE_ZERO else DATA)


def coalesce(extents: Iterable[Extent]) -> Iterator[Extent]:
    pending: Extent | None = None
    for ext in extents:
        if pending is not None and pending.end == ext.offset and pending.kind == ext.kind:
            pending = Extent(pending.offset, pending.length + ext.length, ext.kind)
            continue
        if pending is not None:
            yield pending
        pending = ext
    if pending is not None:
        yield pending


def iter_extents(status: StatusFn, size: int, bitmap: str | None = None, *, window: int = WINDOW,
                 max_query: int = MAX_QUERY, export: str = "") -> Iterator[Extent]:
    """Extents of the whole disk, computed window by window (memory does not grow with size)."""
    contexts = [BASE_ALLOCATION] + ([bitmap] if bitmap else [])

    def windows() -> Iterator[Extent]:
        for start in range(0, size, window):
            runs = collect(status, contexts, start, min(start + window, size), max_query=max_query, export=export)
            yield from classify(runs, bitmap)

    return coalesce(windows())


def split(extents: Iterable[Extent], chunk: int) -> Iterator[Extent]:
    """Data extents cut into read requests of at most ``chunk`` bytes (aligned to ``chunk``)."""
    for ext in extents:
        if ext.kind != DATA or ext.length <= chunk:
            yield ext
            continue
        pos = ext.offset
        while pos < ext.end:
            nxt = min((pos // chunk + 1) * chunk, ext.end)
            yield Extent(pos, nxt - pos, DATA)
            pos = nxt


@dataclass(frozen=True)
class Summary:
    data_bytes: int
    zero_bytes: int
    extents: int


def summarize(extents: Iterable[Extent]) -> Summary:
    data = zero = count = 0
    for ext in extents:
        count += 1
        if ext.kind == DATA:
            data += ext.length
        else:
            zero += ext.length
    return Summary(data, zero, count)
