"""Property tests: random extent layouts round-trip exactly through writer and reader."""
from __future__ import annotations

import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.stream_helpers import image_of, meta, pipe, stream_bytes
from virtnbd.stream import open_stream


@st.composite
def layouts(draw: st.DrawFn) -> tuple[int, list[tuple[str, int, object]]]:
    pieces = draw(st.lists(st.tuples(st.integers(0, 3000), st.sampled_from(["data", "zero"]),
                                     st.integers(1, 3000), st.sampled_from(["random", "pattern", "zeros"])),
                           max_size=12))
    layout: list[tuple[str, int, object]] = []
    pos = 0
    for gap, kind, length, fill in pieces:
        pos += gap
        if kind == "zero":
            layout.append(("zero", pos, length))
        elif fill == "random":
            layout.append(("data", pos, draw(st.binary(min_size=length, max_size=length))))
        elif fill == "pattern":
            unit = draw(st.binary(min_size=1, max_size=16))
            layout.append(("data", pos, (unit * length)[:length]))
        else:
            layout.append(("data", pos, bytes(length)))
        pos += length
    return pos + draw(st.integers(0, 5000)), layout


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts(), st.sampled_from([None, "lz4", "zstd"]), st.sampled_from([None, 1]))
def test_layout_round_trips(case: tuple[int, list[tuple[str, int, object]]], method: str | None,
                            level: int | None) -> None:
    size, layout = case
    m = meta(method, size=size)
    data = stream_bytes(m, layout, level=level)
    want = [(k, o, v if k == "data" else None) for k, o, v in layout]
    lengths = [len(v) if isinstance(v, bytes) else v for _, _, v in layout]

    with open_stream(io.BytesIO(data), path="<mem>") as r:       # random access through the index
        assert r.meta == m
        refs = r.frames()
        want_refs = [(k, o, n) for (k, o, _), n in zip(layout, lengths, strict=True)]
        assert [(x.kind, x.offset, x.length) for x in refs] == want_refs
        for ref, (kind, _, val) in zip(refs, layout, strict=True):
            assert r.read(ref) == (val if kind == "data" else bytes(ref.length))
        assert r.read_range(0, size) == image_of(layout, size)
        totals = r.verify()
        assert totals.stored_bytes == len(data)

    reader = open_stream(pipe(data), path="<pipe>")                 # sequential, non-seekable
    assert [(ref.kind, ref.offset, got) for ref, got in reader.iter_frames()] == want
    assert reader.totals == totals

    reader = open_stream(pipe(data), path="<pipe>")                 # reused buffer: copy before the next step
    got = [(ref.kind, ref.offset, None if v is None else bytes(v)) for ref, v in reader.iter_frames(reuse_buffer=True)]
    assert got == want
