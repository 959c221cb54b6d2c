"""extents: per-context coverage, gap re-query, merge into data/zero runs, splitting."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtnbd import errors
from virtnbd.source.extents import (
    BASE_ALLOCATION,
    DATA,
    ZERO,
    Extent,
    collect,
    iter_extents,
    split,
    summarize,
)

BITMAP = "qemu:dirty-bitmap:backup-sda"
HOLE_ZERO = 3


class FakeServer:
    """Block status over per-byte-range maps; each context answers at most ``limit[ctx]`` bytes."""

    def __init__(self, maps: dict[str, list[tuple[int, int, int]]], limits: dict[str, int] | None = None) -> None:
        self.maps = maps
        self.limits = limits or {}
        self.queries: list[tuple[int, int]] = []

    def __call__(self, offset: int, count: int) -> dict[str, list[tuple[int, int]]]:
        self.queries.append((offset, count))
        out: dict[str, list[tuple[int, int]]] = {}
        for ctx, runs in self.maps.items():
            budget = self.limits.get(ctx, count)
            entries: list[tuple[int, int]] = []
            for start, length, flags in runs:
                end = start + length
                if end <= offset or budget <= 0:
                    continue
                s = max(start, offset)
                take = min(end - s, budget)
                entries.append((take, flags))
                budget -= take
            out[ctx] = entries
        return out


def test_full_describes_every_byte() -> None:
    server = FakeServer({BASE_ALLOCATION: [(0, 4096, 0), (4096, 8192, HOLE_ZERO), (12288, 4096, 0)]})
    got = list(iter_extents(server, 16384))
    assert got == [Extent(0, 4096, DATA), Extent(4096, 8192, ZERO), Extent(12288, 4096, DATA)]


def test_hole_without_zero_flag_is_data() -> None:
    server = FakeServer({BASE_ALLOCATION: [(0, 8192, 1)]})   # hole, but reads may not be zero
    assert list(iter_extents(server, 8192)) == [Extent(0, 8192, DATA)]


def test_allocated_zero_is_zero() -> None:
    server = FakeServer({BASE_ALLOCATION: [(0, 8192, 2)]})
    assert list(iter_extents(server, 8192)) == [Extent(0, 8192, ZERO)]


def test_inc_only_dirty_and_dirty_holes_become_zero() -> None:
    server = FakeServer({
        BASE_ALLOCATION: [(0, 65536, 0), (65536, 65536, HOLE_ZERO), (131072, 65536, 0)],
        BITMAP: [(0, 32768, 0), (32768, 65536, 1), (98304, 98304, 0)],
    })
    got = list(iter_extents(server, 196608, BITMAP))
    assert got == [Extent(32768, 32768, DATA), Extent(65536, 32768, ZERO)]


def test_contexts_answering_different_lengths_are_requeried() -> None:
    base = [(0, 1 << 20, 0)]
    dirty = [(i * 4096, 4096, i % 2) for i in range(256)]
    server = FakeServer({BASE_ALLOCATION: base, BITMAP: dirty}, limits={BITMAP: 16384})
    got = list(iter_extents(server, 1 << 20, BITMAP))
    assert got == [Extent(i * 4096, 4096, DATA) for i in range(1, 256, 2)]
    assert len(server.queries) >= 64          # the short context forced re-queries
    assert server.queries[1][0] == 16384      # the next query starts at the least-covered context


def test_base_shorter_than_bitmap() -> None:
    base = [(0, 8192, 0), (8192, 8192, HOLE_ZERO)]
    server = FakeServer({BASE_ALLOCATION: base, BITMAP: [(0, 16384, 1)]}, limits={BASE_ALLOCATION: 4096})
    assert list(iter_extents(server, 16384, BITMAP)) == [Extent(0, 8192, DATA), Extent(8192, 8192, ZERO)]


def test_answer_beyond_request_is_clipped() -> None:
    def status(offset: int, count: int) -> dict[str, list[tuple[int, int]]]:
        return {BASE_ALLOCATION: [(1 << 30, 0)]}     # a server may describe more than asked
    runs = collect(status, [BASE_ALLOCATION], 0, 4096)
    assert [(r.offset, r.length) for r in runs[BASE_ALLOCATION]] == [(0, 4096)]


def test_no_progress_is_an_error() -> None:
    def status(offset: int, count: int) -> dict[str, list[tuple[int, int]]]:
        return {BASE_ALLOCATION: [(count, 0)]}       # never answers the bitmap
    with pytest.raises(errors.NbdError, match="no progress.*dirty-bitmap"):
        list(iter_extents(status, 8192, BITMAP, export="sda"))


def test_windows_bound_queries_and_coalesce() -> None:
    server = FakeServer({BASE_ALLOCATION: [(0, 1 << 20, 0)]})
    got = list(iter_extents(server, 1 << 20, window=65536))
    assert got == [Extent(0, 1 << 20, DATA)]
    assert all(count <= 65536 for _off, count in server.queries)


def test_split_aligns_data_and_keeps_zero_whole() -> None:
    exts = [Extent(1000, 10000, DATA), Extent(11000, 100000, ZERO)]
    got = list(split(exts, 4096))
    assert got[:4] == [Extent(1000, 3096, DATA), Extent(4096, 4096, DATA), Extent(8192, 2808, DATA),
                       Extent(11000, 100000, ZERO)]
    assert summarize(got).data_bytes == 10000


runs_strategy = st.lists(st.tuples(st.integers(1, 8), st.integers(0, 3)), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(base=runs_strategy, dirty=runs_strategy, limit_b=st.integers(1, 40), limit_d=st.integers(1, 40),
       seed=st.integers(0, 1000))
def test_matches_byte_model(base, dirty, limit_b, limit_d, seed) -> None:  # type: ignore[no-untyped-def]
    """Property: the result equals a per-block model, whatever lengths each context answers with."""
    block = 512

    def build(runs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
        out, pos = [], 0
        for n, flags in runs:
            out.append((pos * block, n * block, flags))
            pos += n
        return out

    b, d = build(base), build(dirty)
    size = min(b[-1][0] + b[-1][1], d[-1][0] + d[-1][1])
    server = FakeServer({BASE_ALLOCATION: b, BITMAP: d}, {BASE_ALLOCATION: limit_b * block, BITMAP: limit_d * block})
    window = random.Random(seed).choice([block, 3 * block, 1 << 20])
    got = list(iter_extents(server, size, BITMAP, window=window))

    def flag_at(runs: list[tuple[int, int, int]], pos: int) -> int:
        return next(f for s, n, f in runs if s <= pos < s + n)

    model = []
    for pos in range(0, size, block):
        if flag_at(d, pos) & 1:
            model.append((pos, ZERO if flag_at(b, pos) & 2 else DATA))
    flat = [(pos, e.kind) for e in got for pos in range(e.offset, e.end, block)]
    assert flat == model
    assert all(x.end <= y.offset for x, y in zip(got, got[1:], strict=False))
