"""Collapse a chain of stream files into ONE final extent map (newest wins).

Input: the frame lists of every stream file of one disk, root first, with the
virtual size of each point. Output: a sorted, gap-free list of :class:`Extent`
covering ``[0, virtual_size)`` of the point being restored, each either zero or
a slice of one data frame of one file. Applying that map writes every byte of
the result exactly once, whatever the chain length.

Algorithm: walk the layers newest first keeping the set of disk ranges already
decided (``covered``, sorted disjoint intervals). A frame contributes only its
parts not yet covered; then the layer's frames are merged into ``covered``.
Each layer is one linear sweep, so the cost is O(frames in the chain).
Ranges no layer mentions are zero (the root is a full/copy: what it does not
list reads as zero). A layer's data is clipped to the smallest virtual size of
any newer point, so a shrink followed by a grow does not resurrect old data.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol


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
    """The frames of one stream file (one point of one disk)."""

    path: str
    point: str
    virtual_size: int
    frames: Sequence[FrameLike]


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


Interval = tuple[int, int]


def _uncovered(covered: list[Interval], idx: int, start: int, end: int) -> tuple[list[Interval], int]:
    """Parts of [start, end) outside ``covered``; ``idx`` is a monotone cursor into it."""
    while idx < len(covered) and covered[idx][1] <= start:
        idx += 1
    pieces: list[Interval] = []
    pos = start
    j = idx
    while pos < end and j < len(covered) and covered[j][0] < end:
        cs, ce = covered[j]
        if cs > pos:
            pieces.append((pos, cs))
        pos = max(pos, ce)
        j += 1
    if pos < end:
        pieces.append((pos, end))
    return pieces, idx


def _merge(a: list[Interval], b: Iterable[Interval]) -> list[Interval]:
    """Union of two sorted interval lists, adjacent intervals coalesced."""
    out: list[Interval] = []
    ib = iter(b)
    nb = next(ib, None)
    ia = 0
    while ia < len(a) or nb is not None:
        if nb is None or (ia < len(a) and a[ia][0] <= nb[0]):
            cur = a[ia]
            ia += 1
        else:
            cur = nb
            nb = next(ib, None)
        if out and cur[0] <= out[-1][1]:
            if cur[1] > out[-1][1]:
                out[-1] = (out[-1][0], cur[1])
        else:
            out.append(cur)
    return out


def collapse(layers: Sequence[Layer], disk: str = "", virtual_size: int | None = None) -> Plan:
    """Build the final extent map of the newest layer (the point being restored)."""
    if not layers:
        raise ValueError("collapse needs at least one layer")
    size = layers[-1].virtual_size if virtual_size is None else virtual_size
    limit = size
    covered: list[Interval] = []
    found: list[Extent] = []
    for index in range(len(layers) - 1, -1, -1):
        layer = layers[index]
        limit = min(limit, layer.virtual_size)
        ranges: list[Interval] = []
        cursor = 0
        for frame in layer.frames:
            start, end = frame.offset, min(frame.offset + frame.length, limit)
            if end <= start:
                continue
            ranges.append((start, end))
            pieces, cursor = _uncovered(covered, cursor, start, end)
            for ps, pe in pieces:
                if frame.kind == "data":
                    found.append(Extent(ps, pe - ps, index, frame))
                else:
                    found.append(Extent(ps, pe - ps, None, None))
        ranges.sort()
        covered = _merge(covered, ranges)
    found.sort(key=lambda e: e.start)
    return Plan(disk=disk, virtual_size=size, layers=tuple(layers), extents=tuple(_fill_and_coalesce(found, size)))


def _fill_and_coalesce(found: list[Extent], size: int) -> list[Extent]:
    out: list[Extent] = []

    def add(ext: Extent) -> None:
        if out and ext.is_zero and out[-1].is_zero and out[-1].end == ext.start:
            out[-1] = Extent(out[-1].start, out[-1].length + ext.length, None, None)
        else:
            out.append(ext)

    pos = 0
    for ext in found:
        if ext.start > pos:
            add(Extent(pos, ext.start - pos, None, None))
        add(ext)
        pos = ext.end
    if pos < size:
        add(Extent(pos, size - pos, None, None))
    return out
