#!/usr/bin/env python3
"""Consolidation benchmark: merging a full (1.5 GiB of data) + 20 incs into one full, against restoring
the newest point of the same chain to a raw file, in the same run.

The chain is the restore benchmark's synthetic "long" set (bench_restore.build: 4 GiB virtual,
1.5 GiB incompressible data in 1 MiB frames, 20 incs of 32 MiB). Each repetition consolidates a
fresh copy (the copy is not timed) with ``virtnbdprune --consolidate virtnbdbackup.20``; the newest
point's verify result is recorded before (untimed), as after a nightly backup + verify, so the
timed run is the consolidation pass itself.

Ratios printed (target in brackets):
  consolidate full + 20 incs / restore newest point to raw   [<= 1.25]
  peak RSS of virtnbdprune --consolidate                      [<= 128 MiB]
Also printed (no target): the phases virtnbdprune logs (writing the new full, removing the merged
files) and the ratio without the removals, which a restore does not do: freeing 2 GiB waits for
the file system (on an ext4 without a journal mounted with ``discard`` every unlink waits for its
blocks' discards). Both sides fsync what they write.

``--loop-fs GiB`` runs the whole benchmark on a fresh ext4 of that size on a loop device, mounted
with the default options (no ``discard``; ext4's documentation recommends ``fstrim`` instead), as
most backup volumes are: the figures then show what the removals cost where unlink does not wait
for the device. ``--dir`` on another mount measures that file system.

Usage: .venv/bin/python bench/bench_consolidate.py [--size GiB] [--data GiB] [--repeat N] [--dir DIR]
                                                  [--loop-fs GiB]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from bench_restore import GiB, MiB, build, drop, restore_cmd  # noqa: E402

from virtnbd.backupset.store import LocalStore  # noqa: E402
from virtnbd.retention import verifylog  # noqa: E402

PRUNE = [sys.executable, os.path.join(ROOT, "virtnbdprune")]
PHASES = {"write": re.compile(r"synthetic full .* written in ([0-9.]+) s"),
          "remove": re.compile(r"removed \d+ file\(s\) .* in ([0-9.]+) s")}


def timed(argv: list[str], rss_file: str, log_file: str) -> tuple[float, int, float, dict[str, float]]:
    """Wall time, peak RSS (KiB), CPU seconds (user+sys, by /usr/bin/time) of one command, and the
    phase times it logged (stderr)."""
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", rss_file, *argv], stdout=subprocess.DEVNULL,
                              stderr=log, check=False)
    elapsed = time.perf_counter() - t0
    with open(log_file) as log:
        text = log.read()
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n{text[-2000:]}")
    with open(rss_file) as f:
        rss, user, sys_ = f.read().split()[-3:]
    phases = {k: sum(float(m) for m in rx.findall(text)) for k, rx in PHASES.items()}
    return elapsed, int(rss), float(user) + float(sys_), phases


@contextlib.contextmanager
def loop_fs(mountpoint: str, gib: float) -> Iterator[None]:
    """A fresh ext4 of ``gib`` GiB (sparse image beside the mount point) mounted at ``mountpoint`` with
    the default options, unmounted and deleted afterwards."""
    image = mountpoint.rstrip("/") + ".img"
    with open(image, "wb") as f:
        f.truncate(int(gib * GiB))
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", image], check=True)
        os.makedirs(mountpoint, exist_ok=True)
        subprocess.run(["mount", "-o", "loop", image, mountpoint], check=True)
        try:
            yield
        finally:
            subprocess.run(["umount", mountpoint], check=True)
    finally:
        os.unlink(image)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=4.0)
    ap.add_argument("--data", type=float, default=1.5)
    ap.add_argument("--incs", type=int, default=20)
    ap.add_argument("--change", type=int, default=32, help="MiB changed per inc (default 32)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp/vnbd-bench-consolidate")
    ap.add_argument("--loop-fs", type=float, default=0.0, metavar="GiB",
                    help="run on a fresh ext4 of this size on a loop device (default mount options, no discard)")
    args = ap.parse_args()
    drop(args.dir)
    if not args.loop_fs:
        try:
            return measure(args)
        finally:
            drop(args.dir)
    with loop_fs(args.dir, args.loop_fs):
        return measure(args)


def measure(args: argparse.Namespace) -> int:
    os.makedirs(args.dir, exist_ok=True)
    t0 = time.perf_counter()
    paths = build(args.dir, size=int(args.size * GiB), data=int(args.data * GiB), incs=args.incs,
                  change=args.change * MiB)
    long = paths["long"]
    result = verifylog.verify_point(LocalStore(long), f"virtnbdbackup.{args.incs}")
    assert result.ok, result.error
    print(f"built and verified the chain in {time.perf_counter() - t0:.1f} s under {args.dir}")
    work, out, rss_file = os.path.join(args.dir, "work"), os.path.join(args.dir, "out"), os.path.join(args.dir, "rss")
    times: dict[str, list[float]] = {"consolidate": [], "restore-raw": []}
    cpus: dict[str, list[float]] = {"consolidate": [], "restore-raw": []}
    loads: list[float] = []
    peaks: list[int] = []
    phases: dict[str, list[float]] = {"write": [], "remove": []}
    try:
        for rep in range(args.repeat):
            order = ("consolidate", "restore-raw") if rep % 2 == 0 else ("restore-raw", "consolidate")
            for key in order:
                drop(work)
                drop(out)
                if key == "consolidate":
                    shutil.copytree(long, work)
                    os.sync()
                    argv = [*PRUNE, "-i", work, "--consolidate", f"virtnbdbackup.{args.incs}"]
                else:
                    argv = restore_cmd(long, out, "raw", 4)
                secs, peak, cpu, logged = timed(argv, rss_file, os.path.join(args.dir, "log"))
                times[key].append(secs)
                cpus[key].append(cpu)
                loads.append(os.getloadavg()[0])
                if key == "consolidate":
                    peaks.append(peak)
                    for name, secs_logged in logged.items():
                        phases[name].append(secs_logged)
    finally:
        for name in os.listdir(args.dir) if os.path.isdir(args.dir) else ():
            drop(os.path.join(args.dir, name))
    for k, v in times.items():
        print(f"{k:12s} median {statistics.median(v):6.2f} s   (runs: {', '.join(f'{x:.2f}' for x in v)}; "
              f"CPU user+sys {', '.join(f'{x:.2f}' for x in cpus[k])} s)")
    print(f"load average (1 min) after each run: {', '.join(f'{x:.2f}' for x in loads)}")
    for name, logged_secs in phases.items():
        print(f"  consolidate phase {name:6s} {', '.join(f'{x:.2f}' for x in logged_secs)} s")
    without = statistics.median((a - r) / b for a, r, b in zip(times["consolidate"], phases["remove"],
                                                                  times["restore-raw"], strict=True))
    print(f"the same without the removal of the merged files (a restore removes nothing): {without:.2f}")
    ratio = statistics.median(a / b for a, b in zip(times["consolidate"], times["restore-raw"], strict=True))
    rss = max(peaks) / 1024
    print(f"consolidate full + {args.incs} incs / restore newest to raw: {ratio:.2f}  [<= 1.25] "
          f"{'ok' if ratio <= 1.25 else 'OVER'}")
    print(f"peak RSS of the consolidation: {rss:.0f} MiB  [<= 128] {'ok' if rss <= 128 else 'OVER'}")
    return 0 if ratio <= 1.25 and rss <= 128 else 1


if __name__ == "__main__":
    sys.exit(main())
