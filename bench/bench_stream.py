#!/usr/bin/env python3
"""Benchmark the stream writer/reader against a plain sequential write/read of the same bytes.

Layout: a virtual disk of --size bytes (default 1 GiB) cut into extents of
1-4 MiB, alternately data (incompressible random bytes) and zero, so about
half is data. The reference writes the same data bytes to a plain file with
the same write sizes, then fsyncs; it reads them back with readinto() into a
reused buffer. The stream side writes frames (xxh3-128 checksums, headers,
chained digest, file digest, index) and fsyncs; it reads back with
iter_frames(), which verifies every checksum and the chained digest, with
and without reuse_buffer, and by random access (index + read() per frame).
Both are measured in the same run, interleaved, best of --repeat.

Target (issue 3): stream write >= 0.8x plain write, stream read >= 0.8x plain read.

    .venv/bin/python bench/bench_stream.py [--size 1G] [--dir /var/tmp] [--repeat 2] [--cold]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from virtnbd.stream import StreamMeta, StreamWriter, open_stream

MiB = 1 << 20
POOL = 64 * MiB
Layout = list[tuple[str, int, int, int]]   # kind, offset, length, pool offset


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def make_layout(size: int, seed: int = 1) -> Layout:
    rng = random.Random(seed)
    layout: Layout = []
    offset, kind = 0, "data"
    while offset < size:
        length = min(rng.randint(1, 4) * MiB, size - offset)
        layout.append((kind, offset, length, rng.randrange(0, POOL - length + 1) if kind == "data" else 0))
        offset += length
        kind = "zero" if kind == "data" else "data"
    return layout


def make_pool(compressible: bool) -> bytes:
    rng = random.Random(7)
    if not compressible:
        return rng.randbytes(POOL)
    words = [rng.randbytes(rng.randint(2, 9)).hex().encode() + b" " for _ in range(2000)]
    out = bytearray()
    while len(out) < POOL:
        if rng.random() < 0.5:
            out += rng.randbytes(4096)
        else:
            block = b"".join(rng.choices(words, k=600))
            out += block[:4096].ljust(4096, b"\0")
    return bytes(out[:POOL])


def fsync_close(f) -> None:  # type: ignore[no-untyped-def]
    f.flush()
    os.fsync(f.fileno())
    f.close()


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def plain_write(path: Path, layout: Layout, pool: memoryview) -> None:
    f = open(path, "wb")  # noqa: SIM115
    for kind, _, length, at in layout:
        if kind == "data":
            f.write(pool[at:at + length])
    fsync_close(f)


def plain_read(path: Path, layout: Layout) -> int:
    buf = bytearray(4 * MiB)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        for kind, _, length, _ in layout:
            if kind == "data":
                got = f.readinto(view[:length])
                total += got or 0
    return total


def stream_write(path: Path, layout: Layout, pool: memoryview, method: str | None, size: int) -> None:
    meta = StreamMeta(virtual_size=size, disk="sda", disk_format="qcow2", level="full", checkpoint="virtnbdbackup.0",
                      parent=None, time="2026-11-22T00:00:00+00:00", compression=method, tool_version="bench",
                      extra={})
    f = open(path, "wb")  # noqa: SIM115
    with StreamWriter(f, meta, str(path)) as w:
        for kind, offset, length, at in layout:
            if kind == "data":
                w.write_data(offset, pool[at:at + length])
            else:
                w.write_zero(offset, length)
        w.finish()
    fsync_close(f)


def plain_read_bytes(path: Path, layout: Layout) -> int:
    total = 0
    with open(path, "rb") as f:
        for kind, _, length, _ in layout:
            if kind == "data":
                data = f.read(length)    # held until the next read, like any consumer's loop variable
                total += len(data)
    return total


def stream_read(path: Path, reuse: bool = False) -> int:
    total = 0
    with open_stream(path) as r:
        for _ref, data in r.iter_frames(reuse_buffer=reuse):
            if data is not None:
                total += len(data)
    return total


def stream_read_index(path: Path) -> int:
    """Random access as restore does it: frames() from the index, read() each data frame (pread)."""
    total = 0
    with open_stream(path) as r:
        for ref in r.frames():
            if ref.kind == "data":
                data = r.read(ref)
                total += len(data)
    return total


def measure(args: argparse.Namespace, layout: Layout, pool: memoryview, files: tuple[Path, Path],
            method: str | None) -> dict[str, float]:
    """Plain and stream runs interleaved (load on a shared machine hits both alike); best of each."""
    plain, stream = files
    runs: dict[str, Callable[[], object]] = {
        "pw": lambda: plain_write(plain, layout, pool),
        "sw": lambda: stream_write(stream, layout, pool, method, args.size),
        "pr": lambda: plain_read(plain, layout),
        "sr": lambda: stream_read(stream, reuse=True),
        "pb": lambda: plain_read_bytes(plain, layout),
        "sb": lambda: stream_read(stream),
        "si": lambda: stream_read_index(stream),
    }
    before: dict[str, Callable[[], None] | None] = {
        "pw": lambda: plain.unlink(missing_ok=True), "sw": lambda: stream.unlink(missing_ok=True)}
    for key in ("pr", "pb", "sr", "sb", "si"):
        target = plain if key[0] == "p" else stream
        before[key] = (lambda t=target: drop_cache(t)) if args.cold else None  # type: ignore[misc]
    best_of = dict.fromkeys(runs, float("inf"))
    for _ in range(args.repeat):
        for key, fn in runs.items():
            prepare = before.get(key)
            if prepare is not None:
                prepare()
            t0 = time.perf_counter()
            fn()
            best_of[key] = min(best_of[key], time.perf_counter() - t0)
    return best_of


def rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / MiB:8.0f} MiB/s"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="virtual disk size (default 1G)")
    ap.add_argument("--dir", default="/var/tmp", help="where to write the test files")
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement, best is kept")
    ap.add_argument("--cold", action="store_true", help="drop the page cache of the file before each read")
    ap.add_argument("--methods", default="none,lz4,zstd", help="compression methods to measure")
    ap.add_argument("--compressible", action="store_true",
                    help="data like a used file system (half random 4 KiB blocks, half low-entropy text) "
                         "instead of incompressible random bytes")
    args = ap.parse_args(argv)

    pool = memoryview(make_pool(args.compressible))
    layout = make_layout(args.size)
    data_bytes = sum(length for kind, _, length, _ in layout if kind == "data")
    work = Path(tempfile.mkdtemp(prefix="bench-stream-", dir=args.dir))
    plain, stream = work / "plain.raw", work / "stream.data"
    try:
        print(f"disk {args.size / MiB:.0f} MiB, {len(layout)} extents, data {data_bytes / MiB:.0f} MiB, "
              f"{'compressible' if args.compressible else 'random'} data, "
              f"{'cold' if args.cold else 'warm'} cache, best of {args.repeat}, dir {args.dir}")
        for name in args.methods.split(","):
            method = None if name == "none" else name
            t = measure(args, layout, pool, (plain, stream), method)
            if stream_read(stream) != data_bytes:
                raise SystemExit("stream read returned the wrong amount of data")
            stored = stream.stat().st_size
            print(f"{name}: file {stored / MiB:.0f} MiB")
            print(f"  write  plain {rate(data_bytes, t['pw'])}  stream {rate(data_bytes, t['sw'])}  "
                  f"= {t['pw'] / t['sw']:4.2f}x")
            print(f"  read   plain readinto {rate(data_bytes, t['pr'])}  stream iter_frames(reuse_buffer) "
                  f"{rate(data_bytes, t['sr'])}  = {t['pr'] / t['sr']:4.2f}x")
            print(f"  read   plain read()   {rate(data_bytes, t['pb'])}  stream iter_frames()             "
                  f"{rate(data_bytes, t['sb'])}  = {t['pb'] / t['sb']:4.2f}x")
            print(f"  read   plain read()   {rate(data_bytes, t['pb'])}  stream frames()+read()           "
                  f"{rate(data_bytes, t['si'])}  = {t['pb'] / t['si']:4.2f}x")
            stream.unlink()
    finally:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
