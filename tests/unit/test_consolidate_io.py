"""Consolidation's I/O helpers: runs read into recycled buffers, the new stream written by a thread."""
from __future__ import annotations

import os
from pathlib import Path

import xxhash

from tests.unit.stream_helpers import meta
from tests.unit.stream_helpers import write_layout as write
from virtnbd.retention.consolidate import _Buffers, _Writeback
from virtnbd.stream import open_stream


def test_a_recycled_buffer_gives_the_same_checked_frames(tmp_path: Path) -> None:
    frames = [("data", i << 20, os.urandom(300_000)) for i in range(3)]
    src = tmp_path / "src"
    with open(src, "wb") as f:
        write(f, meta(None), frames)
    with open_stream(open(src, "rb"), str(src), owns=True) as r:
        batch = [(ref.pos, ref.offset, ref.length) for ref in r.frames()]
        fresh_view, fresh = r.read_stored_batch(batch)
        dirty = bytearray(b"\xff" * (r.batch_span(batch) + 4096))        # stale bytes of an earlier run
        view, items = r.read_stored_batch(batch, into=dirty)
        assert view.obj is dirty and bytes(view) == bytes(fresh_view)
        assert [bytes(d) for _, _, d in items] == [bytes(d) for _, _, d in fresh] == [v for _, _, v in frames]
        small = bytearray(16)                                            # too small: read elsewhere
        view, _ = r.read_stored_batch(batch, into=small)
        assert view.obj is not small and bytes(view) == bytes(fresh_view)


def test_the_writer_thread_writes_in_order_then_recycles(tmp_path: Path) -> None:
    chunks = [os.urandom(n) for n in (10, 5 << 20, 3, 1 << 20, 7)]
    written_when_recycled: list[int] = []
    buffers = _Buffers(2)
    with open(tmp_path / "out", "wb") as f, _Writeback(f) as out:

        def recycle(buf: bytearray) -> None:
            f.flush()
            written_when_recycled.append(os.fstat(f.fileno()).st_size)
            buffers.put(buf)

        for chunk in chunks:
            out.write(memoryview(chunk))
            out.after_writes(recycle, buffers.get(1))
        out.flush()
        digest = out.hexdigest()
    data = (tmp_path / "out").read_bytes()
    assert data == b"".join(chunks)
    assert digest == xxhash.xxh3_128(data).hexdigest()
    # each buffer came back only once the writes handed over before it were done
    assert written_when_recycled == [sum(map(len, chunks[:n + 1])) for n in range(len(chunks))]
