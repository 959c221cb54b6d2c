#!/usr/bin/env python3
"""Scale benchmark: how restore/verify time and peak RSS grow with frames, points and disks.

Sets are written directly with the project's StreamWriter (tests/lab/scale_sets.py):
every point changes ``--frames / points`` random 4 KiB blocks of a 2 GiB disk. Each
set is restored (raw) and verified by the real command in a child process that reports
its own peak RSS (VmHWM); a sample of every restored image is compared
with the expected bytes (and the 100-point chain is compared whole with qemu-img).

Tables printed:
  chain length   1 / 5 / 20 / 100 points, same number of frames in total
  frame count    10k / 100k / 1M frames in one point
  disk count     1 / 4 / 16 disks of the same set shape, restored in parallel (-w)
Ratios (targets in brackets):
  restore 100 points, N frames / restore 1 point with the same final content   [<= 1.5]
  peak RSS of restore and verify on the 100-point chain                          [<= 128 MiB]
  restore of 4 disks / restore of one                                            [<= 2.5]

Usage: .venv/bin/python bench/bench_scale.py [--frames N] [--dir DIR] [--keep] [--quick]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tests.lab import scale_sets  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
CPU: list[tuple[float, float]] = []        # (user+sys seconds, load average) of each measured child
CHAIN_CPU: dict[int, float] = {}


def run(args: list[str]) -> tuple[float, int]:
    """Seconds and peak RSS (MiB, the child's own VmHWM) of one virtnbdrestore child."""
    res = scale_sets.run_restore(args, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"virtnbdrestore {' '.join(args)} failed: {res.stderr}")
    CPU.append((res.cpu, os.getloadavg()[0]))
    return res.seconds, res.peak_kib // 1024


def restore(s: scale_sets.ScaleSet, out: str, workers: int = 4) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    secs, rss = run(["-i", s.folder, "-o", out, "--format", "raw", "-w", str(workers)])
    for d in s.disks:
        if not scale_sets.sample_ok(os.path.join(out, f"{d}.raw"), s.expected[d], s.size):
            raise SystemExit(f"{out}/{d}.raw differs from the expected content")
    return secs, rss


def verify(s: scale_sets.ScaleSet) -> tuple[float, int]:
    return run(["-i", s.folder, "-a", "verify"])


def row(label: str, frames: int, secs: float, rss: int, extra: str = "") -> None:
    cpu, load = CPU[-1] if CPU else (0.0, 0.0)
    print(f"| {label:<28} | {frames:>9} | {secs:7.2f} | {rss:5d} | {cpu:6.2f} | {load:4.1f} |{extra}", flush=True)


def chain_table(base: str, size: int, frames: int, lengths: list[int]) -> dict[int, tuple[float, int, object]]:
    print("\n| chain (restore raw)          |    frames |  time s | RSS MiB |  CPU s | load |")
    print("|---|---:|---:|---:|---:|---:|")
    out = {}
    for n in lengths:
        s = scale_sets.build(os.path.join(base, f"chain{n}"), size=size, points=n, changes=frames // n)
        secs, rss = restore(s, os.path.join(base, f"out.chain{n}"))
        row(f"{n} point(s)", s.frames, secs, rss)
        out[n] = (secs, rss, s)
        CHAIN_CPU[n] = CPU[-1][0]
        if n != 100:
            _drop(s, base, f"out.chain{n}")
    return out


def _drop(s: scale_sets.ScaleSet, base: str, out: str) -> None:
    """Remove a measured set and its output (the disk space of the host is shared)."""
    shutil.rmtree(s.folder, ignore_errors=True)
    shutil.rmtree(os.path.join(base, out), ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=1_000_000, help="frames of the long chain (default 1M)")
    ap.add_argument("--size", type=float, default=8.0, help="virtual disk size in GiB (default 8)")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a tenth of the frames, for a first look")
    opts = ap.parse_args()
    frames = opts.frames // (10 if opts.quick else 1)
    size = int(opts.size * GiB)
    base = opts.dir or os.path.join("/var/tmp", f"vnbd-bench-scale-{os.getpid()}")
    os.makedirs(base, exist_ok=True)
    print(f"bench_scale {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({os.cpu_count()} CPUs), "
          f"{frames} frames of 4 KiB on a {opts.size:g} GiB disk")
    try:
        chains = chain_table(base, size, frames, [1, 5, 20, 100])
        long_secs, long_rss, long_set = chains[100]
        single = scale_sets.single_point_copy(long_set, os.path.join(base, "single"))  # type: ignore[arg-type]
        one_secs, one_rss = restore(single, os.path.join(base, "out.single"))
        one_cpu = CPU[-1][0]
        row("1 point, same final content", single.frames, one_secs, one_rss)
        subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw",
                        os.path.join(base, "out.chain100", "vda.raw"), long_set.expected["vda"]],  # type: ignore[attr-defined]
                       check=True)
        v_secs, v_rss = verify(long_set)  # type: ignore[arg-type]
        row("verify, 100 points", long_set.frames, v_secs, v_rss)  # type: ignore[attr-defined]

        print("\n| frames, one point            |    frames |  time s | RSS MiB |  CPU s | load |")
        print("|---|---:|---:|---:|---:|---:|")
        for n in (10_000, 100_000, frames):
            s = scale_sets.build(os.path.join(base, f"frames{n}"), size=size, points=1, changes=n)
            secs, rss = restore(s, os.path.join(base, f"out.frames{n}"))
            row(f"{n} frames", s.frames, secs, rss)
            _drop(s, base, f"out.frames{n}")

        print("\n| disks (restore -w 4)         |    frames |  time s | RSS MiB |  CPU s | load |")
        print("|---|---:|---:|---:|---:|---:|")
        per_disk = max(1000, frames // 10)
        disk_secs, disk_cpu = {}, {}
        for n in (1, 4, 16):
            s = scale_sets.build(os.path.join(base, f"disks{n}"), size=256 * MiB * (4 if n < 16 else 1),
                                 points=1, changes=per_disk // (4 if n == 16 else 1), disks=n)
            secs, rss = restore(s, os.path.join(base, f"out.disks{n}"))
            row(f"{n} disk(s)", s.frames, secs, rss)
            disk_secs[n] = secs
            disk_cpu[n] = CPU[-1][0]
            _drop(s, base, f"out.disks{n}")

        print()
        ratio = long_secs / one_secs
        print(f"RATIO restore 100 points / 1 point, same content: {ratio:.2f} (target <= 1.5) "
              f"{'ok' if ratio <= 1.5 else 'OVER'}; CPU {CHAIN_CPU[100]:.2f} / {one_cpu:.2f} s = "
              f"{CHAIN_CPU[100] / one_cpu:.2f}")
        worst = max(long_rss, v_rss)
        print(f"PEAK RSS restore / verify, 100 points: {long_rss} / {v_rss} MiB (target <= 128) "
              f"{'ok' if worst <= 128 else 'OVER'}")
        ratio4 = disk_secs[4] / disk_secs[1]
        print(f"RATIO restore 4 disks / 1 disk: {ratio4:.2f} (target <= 2.5) {'ok' if ratio4 <= 2.5 else 'OVER'}; "
              f"CPU {disk_cpu[4]:.2f} / {disk_cpu[1]:.2f} s")
    finally:
        if not opts.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
