#!/usr/bin/env python3
"""Restore benchmark: virtnbdrestore against qemu-img convert and cat, in the same run.

The benchmark backup set is built synthetically with StreamWriter (no domain
needed), shaped like the backup issue's benchmark disk: 4 GiB virtual size,
about 1.5 GiB of incompressible data in extents of 1-256 MiB, 1 MiB data
frames (the backup engine's read size), the rest zero/unallocated. A raw
image with the same content is the reference for ``qemu-img convert``.

Ratios printed (target in brackets):
  restore qcow2 / qemu-img convert -t writeback raw->qcow2   [<= 1.0: README says faster]
  restore raw   / qemu-img convert -t writeback raw->raw     [<= 1.25]
  restore 1 full + 20 incs / 1 full + 1 inc, same content     [<= 1.2]
  -a verify / cat files > /dev/null (files evicted from the page cache first)  [<= 1.5]
  peak RSS of virtnbdrestore                                   [<= 128 MiB]

Usage: .venv/bin/python bench/bench_restore.py [--size GiB] [--data GiB] [--repeat N] [--dir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tests.lab import scale_sets  # noqa: E402
from virtnbd.backupset import manifest, naming  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
FRAME = 1 * MiB
RESTORE = [sys.executable, os.path.join(ROOT, "virtnbdrestore")]


def extents(size: int, data: int, rng: random.Random) -> list[tuple[int, int]]:
    """Non-overlapping MiB-aligned extents of 1-256 MiB summing to ~``data`` bytes."""
    chosen: list[tuple[int, int]] = []
    total = 0
    slots = size // MiB
    used = bytearray(slots)
    while total < data:
        length = min(rng.choice([1, 2, 4, 8, 16, 32, 64, 128, 256]), (data - total) // MiB or 1)
        start = rng.randrange(0, slots - length)
        if any(used[start:start + length]):
            continue
        used[start:start + length] = b"\1" * length
        chosen.append((start * MiB, length * MiB))
        total += length * MiB
    return sorted(chosen)


class Content:
    """Deterministic incompressible content for (offset, generation) without storing the disk."""

    def __init__(self) -> None:
        self.pool = os.urandom(64 * MiB + FRAME)

    def block(self, offset: int, gen: int) -> bytes:
        skip = ((offset // FRAME) * 7919 + gen * 104729) % (64 * MiB // 4096) * 4096
        return self.pool[skip:skip + FRAME]


def write_stream(folder: str, level: str, point: str, parent: str | None, *, size: int,
                 blocks: list[tuple[int, bytes]]) -> manifest.DiskEntry:
    return scale_sets.write_stream(folder, "sda", level, point, parent, size, blocks, disk_format="qcow2")


def commit(folder: str, level: str, point: str, parent: str | None, entry: manifest.DiskEntry) -> None:
    p = manifest.Point(name=point, level=level, parent=parent, checkpoint=point, time="2026-11-22T00:00:00+00:00",
                       disks={"sda": entry}, consistency="crash")
    manifest.commit_point(folder, p, "bench", "00000000-0000-4000-8000-000000000000")


def build(base: str, *, size: int, data: int, incs: int, change: int, seed: int = 1) -> dict[str, str]:
    """Three sets and the reference raw image:
    main (1 full), long (1 full + ``incs`` incs), short (1 full + 1 inc with the long chain's final content)."""
    rng = random.Random(seed)
    content = Content()
    exts = extents(size, data, rng)
    full_blocks = [off for start, length in exts for off in range(start, start + length, FRAME)]
    gen: dict[int, int] = dict.fromkeys(full_blocks, 0)
    paths = {k: os.path.join(base, k) for k in ("main", "long", "short")}
    for p in paths.values():
        os.makedirs(p)
    entry = write_stream(paths["main"], "full", "virtnbdbackup.0", None, size=size,
                         blocks=[(o, content.block(o, 0)) for o in full_blocks])
    commit(paths["main"], "full", "virtnbdbackup.0", None, entry)
    for key in ("long", "short"):
        shutil.copyfile(os.path.join(paths["main"], entry.file), os.path.join(paths[key], entry.file))
        commit(paths[key], "full", "virtnbdbackup.0", None, entry)
    changed: set[int] = set()
    parent = "virtnbdbackup.0"
    slots = size // FRAME
    for i in range(1, incs + 1):
        offs = sorted({rng.randrange(slots) * FRAME for _ in range(change // FRAME)})
        for o in offs:
            gen[o] = i
        changed.update(offs)
        point = naming.checkpoint_name(i)
        e = write_stream(paths["long"], "inc", point, parent, size=size,
                         blocks=[(o, content.block(o, i)) for o in offs])
        commit(paths["long"], "inc", point, parent, e)
        parent = point
    e = write_stream(paths["short"], "inc", "virtnbdbackup.1", "virtnbdbackup.0", size=size,
                     blocks=[(o, content.block(o, gen[o])) for o in sorted(changed)])
    commit(paths["short"], "inc", "virtnbdbackup.1", "virtnbdbackup.0", e)
    ref = os.path.join(base, "reference.raw")
    with open(ref, "wb") as f:
        f.truncate(size)
        for o in full_blocks:
            os.pwrite(f.fileno(), content.block(o, 0), o)
    paths["ref"] = ref
    return paths


def timed(argv: list[str], rss_file: str) -> tuple[float, int, float]:
    """Wall time, peak RSS (KiB) and CPU seconds (user+sys, measured by /usr/bin/time) of one command."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", rss_file, *argv], stdout=subprocess.DEVNULL,
                          check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}")
    with open(rss_file) as f:
        rss, user, sys_ = f.read().split()[-3:]
    return elapsed, int(rss), float(user) + float(sys_)


def evict(paths: list[str]) -> None:
    """Drop these files (only) from the page cache, so reads come from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def restore_cmd(folder: str, out: str, fmt: str, workers: int) -> list[str]:
    return [*RESTORE, "-i", folder, "-o", out, "-n", "--format", fmt, "-w", str(workers)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=4.0, help="virtual size in GiB (default 4)")
    ap.add_argument("--data", type=float, default=1.5, help="data in GiB (default 1.5)")
    ap.add_argument("--incs", type=int, default=20)
    ap.add_argument("--change", type=int, default=32, help="MiB changed per inc (default 32)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--dir", default="/var/tmp/vnbd-bench-restore")
    ap.add_argument("--keep", action="store_true", help="keep the generated sets")
    args = ap.parse_args()
    size, data = int(args.size * GiB), int(args.data * GiB)
    drop(args.dir)
    os.makedirs(args.dir)
    t0 = time.perf_counter()
    paths = build(args.dir, size=size, data=data, incs=args.incs, change=args.change * MiB)
    print(f"built sets in {time.perf_counter() - t0:.1f} s under {args.dir}")
    out = os.path.join(args.dir, "out")
    results: dict[str, list[float]] = {}
    rss: list[int] = []
    cpu: dict[str, list[float]] = {}

    def run(key: str, argv: list[str], target: str, cold: list[str] | None = None) -> None:
        drop(target)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if cold:
            evict(cold)
        secs, peak, cpu_secs = timed(argv, os.path.join(args.dir, "rss"))
        cpu.setdefault(key, []).append(cpu_secs)
        if argv[:2] == RESTORE:
            rss.append(peak)
        results.setdefault(key, []).append(secs)
        drop(target)

    files = [os.path.join(paths["main"], f) for f in os.listdir(paths["main"]) if f.endswith(".data")]
    cat = ["sh", "-c", 'cat "$@" > /dev/null', "cat", *files]
    verify = [*RESTORE, "-i", paths["main"], "-a", "verify", "-w", str(args.workers)]
    none = os.path.join(out, "none")

    def convert(fmt: str) -> tuple[str, list[str], str, None]:
        dest = os.path.join(out, f"ref.{fmt}")
        argv = ["qemu-img", "convert", "-t", "writeback", "-f", "raw", "-O", fmt, paths["ref"], dest]
        return (f"convert-{fmt}", argv, dest, None)

    pairs = {  # (ours, reference): run back to back, order alternating, so both see the same machine load
        "qcow2": (("restore-qcow2", restore_cmd(paths["main"], out, "qcow2", args.workers), out, None),
                  convert("qcow2")),
        "raw": (("restore-raw", restore_cmd(paths["main"], out, "raw", args.workers), out, None), convert("raw")),
        "chain": (("long", restore_cmd(paths["long"], out, "qcow2", args.workers), out, None),
                  ("short", restore_cmd(paths["short"], out, "qcow2", args.workers), out, None)),
        "verify": (("verify-cold", verify, none, files), ("cat-cold", cat, none, files)),
        "verify-warm": (("verify-warm", verify, none, None), ("cat-warm", cat, none, None)),
    }
    try:
        for rep in range(args.repeat):
            for first, second in pairs.values():
                for key, argv, target, cold in ((first, second) if rep % 2 == 0 else (second, first)):
                    run(key, argv, target, cold)
    finally:
        if not args.keep:
            drop(args.dir)
    for k, v in sorted(results.items()):
        print(f"{k:16s} median {statistics.median(v):6.2f} s   (runs: {', '.join(f'{x:.2f}' for x in v)})")

    def best(a: str, b: str) -> str:
        """Ratio of the fastest runs, and of the median CPU time: both less sensitive to other load."""
        return (f"best runs {min(results[a]) / min(results[b]):.2f}, "
                f"CPU {statistics.median(cpu[a]) / statistics.median(cpu[b]):.2f}")

    def ratio(a: str, b: str) -> float:
        """Median of the per-repetition ratios (each pair ran back to back)."""
        return statistics.median(x / y for x, y in zip(results[a], results[b], strict=True))

    pairs_used = [
        ("restore qcow2 / qemu-img convert raw->qcow2", "restore-qcow2", "convert-qcow2", 1.0),
        ("restore raw / qemu-img convert raw->raw", "restore-raw", "convert-raw", 1.25),
        (f"restore 1 full + {args.incs} incs / 1 full + 1 inc", "long", "short", 1.2),
        ("verify / cat > /dev/null, files not in page cache", "verify-cold", "cat-cold", 1.5),
    ]
    ratios = [(label, ratio(a, b), limit) for label, a, b, limit in pairs_used]
    for label, a, b, _ in pairs_used:
        print(f"info: {label}: {best(a, b)}")
    print(f"info: verify / cat with the files in the page cache: {ratio('verify-warm', 'cat-warm'):.2f} "
          f"(python start-up ~0.07 s against cat at memory speed)")
    ok = True
    for label, value, limit in ratios:
        flag = "ok" if value <= limit else "OVER"
        ok &= value <= limit
        print(f"RATIO {label}: {value:.2f} (target <= {limit}) {flag}")
    peak = max(rss) / 1024
    print(f"PEAK RSS virtnbdrestore: {peak:.0f} MiB (target <= 128) {'ok' if peak <= 128 else 'OVER'}")
    return 0 if ok and peak <= 128 else 1


if __name__ == "__main__":
    sys.exit(main())
