"""The collapsed extent map equals replaying every layer byte by byte (newest wins)."""
from __future__ import annotations

from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from virtnbd.restore.plan import Layer, collapse, windows


@dataclass(frozen=True)
class Frame:
    kind: str
    offset: int
    length: int
    pos: int


def _layer(idx: int, size: int, spans: list[tuple[str, int, int]]) -> Layer:
    frames, pos = [], 0
    for kind, off, length in spans:
        frames.append(Frame(kind, off, length, pos))
        pos += 100
    return Layer(path=f"f{idx}", point=f"p{idx}", virtual_size=size, frames=frames)


def _replay(layers: list[Layer]) -> list[tuple[int, int] | None]:
    """Model: a list of per-byte owners ((layer, frame pos) or None for zero), resized per point."""
    disk: list[tuple[int, int] | None] = []
    for idx, layer in enumerate(layers):
        disk = disk[: layer.virtual_size] + [None] * max(0, layer.virtual_size - len(disk))
        for f in layer.frames:
            for b in range(f.offset, min(f.offset + f.length, layer.virtual_size)):
                disk[b] = (idx, f.pos) if f.kind == "data" else None
    return disk


def _render(plan) -> list[tuple[int, int] | None]:
    out: list[tuple[int, int] | None] = []
    for ext in plan.extents:
        assert ext.start == len(out)
        for b in range(ext.length):
            if ext.is_zero:
                out.append(None)
            else:
                assert ext.frame.offset <= ext.start + b < ext.frame.offset + ext.frame.length
                assert ext.skip + b == ext.start + b - ext.frame.offset
                out.append((ext.layer, ext.frame.pos))
    return out


@st.composite
def layer_spans(draw, size: int):
    cuts = sorted(set(draw(st.lists(st.integers(0, size), max_size=12))))
    spans = []
    for a, b in zip(cuts, cuts[1:], strict=False):
        if draw(st.booleans()):
            spans.append((draw(st.sampled_from(["data", "data", "zero"])), a, b - a))
    return spans


@st.composite
def chains(draw):
    n = draw(st.integers(1, 8))
    layers = []
    for i in range(n):
        size = draw(st.sampled_from([64, 64, 64, 48, 80]))
        layers.append(_layer(i, size, draw(layer_spans(size))))
    return layers


@settings(max_examples=400, deadline=None)
@given(chains())
def test_collapse_matches_byte_replay(layers):
    plan = collapse(layers)
    assert plan.virtual_size == layers[-1].virtual_size
    assert _render(plan) == _replay(layers)
    assert plan.data_bytes + plan.zero_bytes == plan.virtual_size


@settings(max_examples=300, deadline=None)
@given(chains(), st.integers(1, 40))
def test_small_windows_give_the_same_map(layers, budget):
    """Windows of a few index entries (split frames, refilled batches) give the same bytes."""
    plan = collapse(layers, entry_budget=budget)
    assert _render(plan) == _replay(layers)
    assert plan.extents == collapse(layers).extents


def test_windows_hold_a_bounded_number_of_entries():
    """A 200-frame chain planned with a budget of 64 entries: a window holds at most its share."""
    layers = [_layer(0, 4000, [("data", i * 20, 10) for i in range(200)])]
    layers += [_layer(i, 4000, [("data", i * 20 + 5, 10) for i in range(0, 200, 3)]) for i in range(1, 4)]
    wins = list(windows(layers, entry_budget=64))
    assert len(wins) > 10
    assert max(len(w.data) for w in wins) <= 2 * 64
    assert wins[0].start == 0 and wins[-1].end == 4000
    assert all(a.end == b.start for a, b in zip(wins, wins[1:], strict=False))


def test_newest_wins_and_gaps_are_zero():
    full = _layer(0, 100, [("data", 0, 50), ("zero", 50, 50)])
    inc = _layer(1, 100, [("data", 10, 10), ("zero", 30, 10)])
    plan = collapse([full, inc])
    got = [(e.start, e.length, e.layer) for e in plan.extents]
    assert got == [(0, 10, 0), (10, 10, 1), (20, 10, 0), (30, 10, None), (40, 10, 0), (50, 50, None)]


def test_frame_groups_decode_each_frame_once():
    full = _layer(0, 100, [("data", 0, 100)])
    inc = _layer(1, 100, [("data", 20, 10), ("data", 60, 10)])
    groups = collapse([full, inc]).frame_groups()
    assert [(g[0], len(g[2])) for g in groups] == [(0, 3), (1, 1), (1, 1)]


def test_plan_size_independent_of_chain_length():
    """30 incs rewriting the same range leave exactly one extent for it."""
    layers = [_layer(0, 1000, [("data", 0, 1000)])]
    layers += [_layer(i, 1000, [("data", 100, 50)]) for i in range(1, 31)]
    plan = collapse(layers)
    assert [(e.start, e.length, e.layer) for e in plan.extents] == [(0, 100, 0), (100, 50, 30), (150, 850, 0)]
    assert plan.data_bytes == 1000
