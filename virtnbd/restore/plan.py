"""Collapse a chain of stream files into the final extent map, one bounded window at a time.

Input: per stream file of one disk (root first) its index as batches of
``(is_data, offset, length, pos)`` in offset order, with the virtual size of
each point. Output: a sequence of :class:`Window` objects covering
``[0, virtual_size)`` of the point being restored, in disk order; each holds
the zero ranges and the data pieces (slices of one data frame of one file)
of its part of the disk. Applying every window writes every byte of the
result exactly once, whatever the chain length.

Windows: every layer keeps at least half a batch of index entries ahead (a
batch is ``entry_budget`` entries shared by all layers; at most 1.5 batches are
buffered). A window ends at the smallest end of any layer's buffered entries, so
everything before it is known in every layer; keeping every layer topped up makes
windows span about half the budget instead of one layer's last few entries.
The layers' entries in the window are merged by one sort of a few sorted runs and
cut into clusters of overlapping entries: a cluster of one entry owns itself, a
larger one is swept with a heap of the active frames (newest layer wins). Memory is
1.5 x ``entry_budget`` entries plus one window's pieces, whatever the number of
frames, points or the disk size; planning cost is O(frames read x log layers).
A window holding entries of only one layer skips the sweep (a full backup).

Ranges no layer mentions are zero (the root is a full/copy: what it does not
list reads as zero). A layer's data is clipped to the smallest virtual size of
any newer point, so a shrink followed by a grow does not resurrect old data.

:func:`collapse` keeps the older whole-chain interface (a list of
:class:`Extent`) on top of the same windows, for tests and small tools.
"""
from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Protocol

from virtnbd.stream.format import FrameRef

IndexEntry = tuple[bool, int, int, int]          # is_data, disk offset, length, file position
Entry = tuple[int, int, int, int, int, bool]     # start, end (clipped), pos, frame offset, frame length, is_data
Piece = tuple[int, int, int, Entry]              # start, end, layer index, entry (a data frame)
Batches = Callable[[int], Iterator[Sequence[IndexEntry]]]

ENTRY_BUDGET = 32768                               # index entries buffered for all layers of one disk
_START = itemgetter(0)
INF = 1 << 127


class FrameLike(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def pos(self) -> int: ...


@dataclass(frozen=True)
class Layer:
    """One stream file (one point of one disk): its frames in memory, or a way to read its index in batches."""

    path: str
    point: str
    virtual_size: int
    frames: Sequence[FrameLike] = ()
    batches: Batches | None = field(default=None, compare=False)

    def index(self, batch: int) -> Iterator[Sequence[IndexEntry]]:
        if self.batches is not None:
            return self.batches(batch)
        return _chunks(((f.kind == "data", f.offset, f.length, f.pos) for f in self.frames), batch)


def _chunks(entries: Iterable[IndexEntry], batch: int) -> Iterator[Sequence[IndexEntry]]:
    chunk: list[IndexEntry] = []
    for entry in entries:
        chunk.append(entry)
        if len(chunk) >= batch:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass(frozen=True)
class Window:
    start: int
    end: int
    zeros: list[tuple[int, int]]      # (start, end) ranges that read as zero, coalesced
    data: list[Piece]                 # in disk order

    @property
    def data_bytes(self) -> int:
        return sum(p[1] - p[0] for p in self.data)

    @property
    def zero_bytes(self) -> int:
        return sum(e - s for s, e in self.zeros)


class _Cursor:
    """One layer's entries, one batch at a time, clipped to the layer's size limit."""

    __slots__ = ("batches", "buf", "done", "i", "limit")

    def __init__(self, batches: Iterator[Sequence[IndexEntry]], limit: int) -> None:
        self.batches = batches
        self.limit = limit
        self.buf: list[Entry] = []
        self.i = 0
        self.done = False

    def fill(self, low: int) -> None:
        """Keep at least ``low`` entries ahead (appending the next batch to what is left), so the
        windows of many layers stay large instead of ending at whichever layer ran dry first."""
        lim = self.limit
        while len(self.buf) - self.i < low and not self.done:
            nxt = next(self.batches, None)
            if nxt is None:
                self.done = True
                break
            more = [(off, min(off + ln, lim), pos, off, ln, data) for data, off, ln, pos in nxt if off < lim]
            self.buf = self.buf[self.i:] + more if self.i < len(self.buf) else more
            self.i = 0
            if len(more) < len(nxt):
                self.done = True        # sorted: every later entry is beyond the limit too
        if self.i >= len(self.buf):
            self.buf, self.i = [], 0

    def horizon(self) -> int:
        return self.buf[-1][1] if self.i < len(self.buf) else INF

    def take(self, w1: int) -> list[Entry]:
        buf, i = self.buf, self.i
        j = bisect.bisect_left(buf, w1, lo=i, key=_START)
        taken = buf[i:j]
        self.i = j
        if taken and taken[-1][1] > w1:                  # straddles the window end: split it
            s, e, pos, off, ln, data = taken[-1]
            taken[-1] = (s, w1, pos, off, ln, data)
            self.i = j - 1
            buf[j - 1] = (w1, e, pos, off, ln, data)
        return taken


def windows(layers: Sequence[Layer], virtual_size: int | None = None,
            entry_budget: int = ENTRY_BUDGET) -> Iterator[Window]:
    """The final map of the newest layer, window by window, in disk order."""
    if not layers:
        raise ValueError("collapse needs at least one layer")
    size = layers[-1].virtual_size if virtual_size is None else virtual_size
    batch = max(16, entry_budget // len(layers))
    low = max(1, batch // 2)
    cursors, limit = [], size
    for layer in reversed(layers):
        limit = min(limit, layer.virtual_size)
        cursors.append(_Cursor(layer.index(batch), limit))
    cursors.reverse()
    w0 = 0
    while w0 < size:
        for c in cursors:
            c.fill(low)
        w1 = min(*(c.horizon() for c in cursors), size)
        runs = [(idx, got) for idx, c in enumerate(cursors) if (got := c.take(w1))]
        yield _sweep(runs, w0, w1)
        w0 = w1


def _sweep(runs: list[tuple[int, list[Entry]]], w0: int, w1: int) -> Window:
    zeros: list[tuple[int, int]] = []
    data: list[Piece] = []
    if len(runs) == 1:
        _single(runs[0][0], runs[0][1], w0, w1, zeros, data)
        return Window(w0, w1, zeros, data)
    events = sorted((e[0], -layer, e) for layer, entries in runs for e in entries)
    group: list[tuple[int, int, Entry]] = []        # events overlapping each other (a cluster)
    cur = hi = w0                                   # hi: the end of the cluster so far
    for event in events:
        start, entry = event[0], event[2]
        if start < hi:
            group.append(event)
            hi = max(hi, entry[1])
            continue
        if len(group) == 1:                         # a cluster of one entry owns itself (the common case)
            one = group[0]
            if one[2][5]:
                data.append((one[0], hi, -one[1], one[2]))
            else:
                _zero(zeros, one[0], hi)
            cur, group = hi, []
        elif group:
            _settle(group, hi, zeros, data)
            cur, group = hi, []
        if start > cur:
            _zero(zeros, cur, start)
        group.append(event)
        hi = entry[1]
    if group:
        _settle(group, hi, zeros, data)
        cur = hi
    if cur < w1:
        _zero(zeros, cur, w1)
    return Window(w0, w1, zeros, data)


def _settle(group: list[tuple[int, int, Entry]], hi: int, zeros: list[tuple[int, int]], data: list[Piece]) -> None:
    """Owners of one cluster ``[group[0] start, hi)``: alone it owns itself; else a heap sweep, newest wins."""
    if len(group) == 1:
        start, neg, entry = group[0]
        if entry[5]:
            data.append((start, hi, -neg, entry))
        else:
            _zero(zeros, start, hi)
        return
    heap: list[tuple[int, int, Entry]] = []
    cur = group[0][0]
    for start, neg, entry in group:
        if start > cur:
            _emit(heap, cur, start, zeros, data)
            cur = start
        heapq.heappush(heap, (neg, entry[1], entry))
    _emit(heap, cur, hi, zeros, data)


def _zero(zeros: list[tuple[int, int]], start: int, end: int) -> None:
    if zeros and zeros[-1][1] == start:
        zeros[-1] = (zeros[-1][0], end)
    else:
        zeros.append((start, end))


def _single(layer: int, entries: list[Entry], w0: int, w1: int,  # noqa: PLR0917
            zeros: list[tuple[int, int]], data: list[Piece]) -> None:
    cur = w0
    for e in entries:
        if e[0] > cur:
            _zero(zeros, cur, e[0])
        if e[5]:
            data.append((e[0], e[1], layer, e))
        else:
            _zero(zeros, e[0], e[1])
        cur = e[1]
    if cur < w1:
        _zero(zeros, cur, w1)


def _emit(heap: list[tuple[int, int, Entry]], cur: int, stop: int,
          zeros: list[tuple[int, int]], data: list[Piece]) -> None:
    """Owners of ``[cur, stop)``: the newest active entry at each point (no entry starts inside)."""
    while cur < stop:
        while heap and heap[0][1] <= cur:
            heapq.heappop(heap)
        if not heap:
            _zero(zeros, cur, stop)
            return
        neg, end, entry = heap[0]
        seg = min(end, stop)
        if not entry[5]:
            _zero(zeros, cur, seg)
        elif data and data[-1][3] is entry and data[-1][1] == cur:
            data[-1] = (data[-1][0], seg, -neg, entry)
        else:
            data.append((cur, seg, -neg, entry))
        cur = seg


# -- whole-chain interface -----------------------------------------------------------


@dataclass(frozen=True)
class Extent:
    start: int                  # disk offset
    length: int
    layer: int | None           # index into Plan.layers; None = zeroes
    frame: FrameLike | None     # the data frame holding these bytes

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def skip(self) -> int:
        """Offset of this extent's first byte inside the decoded frame."""
        return self.start - self.frame.offset if self.frame is not None else 0

    @property
    def is_zero(self) -> bool:
        return self.frame is None


@dataclass(frozen=True)
class Plan:
    disk: str
    virtual_size: int
    layers: tuple[Layer, ...]
    extents: tuple[Extent, ...]

    @property
    def data_bytes(self) -> int:
        return sum(e.length for e in self.extents if not e.is_zero)

    @property
    def zero_bytes(self) -> int:
        return sum(e.length for e in self.extents if e.is_zero)

    def frame_groups(self) -> list[tuple[int, FrameLike, list[Extent]]]:
        """Data extents grouped by the frame they come from (each frame decoded once)."""
        groups: dict[tuple[int, int], tuple[int, FrameLike, list[Extent]]] = {}
        for ext in self.extents:
            if ext.frame is None or ext.layer is None:
                continue
            key = (ext.layer, ext.frame.pos)
            if key not in groups:
                groups[key] = (ext.layer, ext.frame, [])
            groups[key][2].append(ext)
        return sorted(groups.values(), key=lambda g: g[2][0].start)


def _frame(known: dict[int, FrameLike], entry: Entry) -> FrameLike:
    """The frame of an entry: the layer's own FrameRef, or one made from the index entry (batched layers)."""
    found = known.get(entry[2])
    return found if found is not None else FrameRef("data", entry[3], entry[4], entry[2])


def collapse(layers: Sequence[Layer], disk: str = "", virtual_size: int | None = None,
             entry_budget: int = ENTRY_BUDGET) -> Plan:
    """The whole final extent map in memory (built from :func:`windows`; for small chains and tests)."""
    size = layers[-1].virtual_size if virtual_size is None and layers else (virtual_size or 0)
    frames = [{f.pos: f for f in layer.frames} for layer in layers]
    out: list[Extent] = []
    for win in windows(layers, virtual_size, entry_budget):
        found = [Extent(s, e - s, None, None) for s, e in win.zeros]
        found += [Extent(s, e - s, layer, _frame(frames[layer], entry)) for s, e, layer, entry in win.data]
        found.sort(key=lambda x: x.start)
        for ext in found:
            last = out[-1] if out else None
            if last is not None and last.end == ext.start and last.layer == ext.layer and last.frame is ext.frame:
                out[-1] = Extent(last.start, last.length + ext.length, ext.layer, ext.frame)
            else:
                out.append(ext)
    return Plan(disk=disk, virtual_size=size, layers=tuple(layers), extents=tuple(out))
