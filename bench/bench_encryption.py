#!/usr/bin/env python3
"""Encryption benchmark: encrypted ÷ unencrypted backup and restore of the same export, in one run.

Not a test: prints ratios of paired rounds (the order alternates per round), best/best, the
CPU time (user+sys) ratio and the peak RSS difference. Every run reads cold: the domain's images
and, for a restore, the set it reads are dropped from the page cache first (a set left cached by
an earlier round made one side of a pair faster than the other). Targets (issue 16): backup and
restore ratio <= 1.15 (uncompressed and lz4), peak RSS within 16 MiB. The data is random by
default: the lz4 runs then measure the compression probe's path (almost every frame is stored raw,
then sealed); ``--kind text`` seals compressed frames (bench_backup's text).

    .venv/bin/python bench/bench_encryption.py [--size 2G] [--data 768M] [--rounds 3] [--kind random|text]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_backup import Bench, GiB, MiB, _bench_env, _drop_caches, make_raw, parse_size  # noqa: E402
from tests.lab.libvirt_lab import DiskSpec, make_lab_dir  # noqa: E402

RESTORE = [sys.executable, str(REPO / "virtnbdrestore")]


def timed(cmd: list[str], dom: object, cold: Path | None = None) -> tuple[float, int, float]:
    """(wall seconds, peak RSS KiB, CPU seconds user+sys) of one command (the domain's images and the
    files under ``cold``, the set a restore reads, dropped from the page cache first: both sides read
    from the disk, whichever ran before). CPU time is less sensitive to other load than wall time."""
    _drop_caches(dom)  # type: ignore[arg-type]
    if cold is not None:
        _drop_folder(cold)
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_bench_env())
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[1]} failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return seconds, int(usage.ru_maxrss), usage.ru_utime + usage.ru_stime


def _drop_folder(folder: Path) -> None:
    """Drop every file under ``folder`` from the page cache (after writing back what is dirty)."""
    os.sync()
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def pair(label: str, rounds: int, plain: list[str], enc: list[str], outputs: tuple[Path, Path],
         *, dom: object, inputs: tuple[Path, Path] | None = None) -> dict[str, float]:
    """``outputs``: what the plain and the encrypted command write (removed before each run);
    ``inputs``: what they read besides the domain (a restore's sets: read cold by both)."""
    ratios, rss_delta, cpu_ratios = [], [], []
    walls: dict[bool, list[float]] = {False: [], True: []}
    for n in range(rounds):
        order = [(False, plain), (True, enc)] if n % 2 == 0 else [(True, enc), (False, plain)]
        got: dict[bool, tuple[float, int, float]] = {}
        for encrypted, cmd in order:
            shutil.rmtree(outputs[encrypted], ignore_errors=True)
            got[encrypted] = timed(cmd, dom, inputs[encrypted] if inputs else None)
            walls[encrypted].append(got[encrypted][0])
        ratios.append(got[True][0] / got[False][0])
        rss_delta.append((got[True][1] - got[False][1]) / 1024)
        cpu_ratios.append(got[True][2] / got[False][2])
        print(f"  {label} round {n}: plain {got[False][0]:.2f}s (cpu {got[False][2]:.2f}s)  encrypted "
              f"{got[True][0]:.2f}s (cpu {got[True][2]:.2f}s)  ratio {ratios[-1]:.3f} (cpu {cpu_ratios[-1]:.3f})  "
              f"rss {got[False][1] / 1024:.0f} -> {got[True][1] / 1024:.0f} MiB  load {os.getloadavg()[0]:.2f}",
              flush=True)
    result = {"ratio_median": round(statistics.median(ratios), 3), "rss_delta_mib_max": round(max(rss_delta), 1),
              "cpu_ratio_median": round(statistics.median(cpu_ratios), 3),
              "ratio_best": round(min(walls[True]) / min(walls[False]), 3)}
    print(f"{label}: encrypted/plain {result['ratio_median']:.3f} (median of {rounds}; best/best "
          f"{result['ratio_best']:.3f}; CPU {result['cpu_ratio_median']:.3f}), RSS delta max "
          f"{result['rss_delta_mib_max']:+.1f} MiB", flush=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=2 * GiB)
    p.add_argument("--data", type=parse_size, default=768 * MiB)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kind", choices=("random", "text"), default="random")
    args = p.parse_args()
    bench = Bench(args)
    work = Path(make_lab_dir(prefix="bench-enc-"))
    results: dict[str, object] = {}
    try:
        key = work / "key"
        key.write_bytes(os.urandom(32))
        key.chmod(0o600)
        raw = work / "disk.raw"
        make_raw(raw, args.size, args.data, args.kind, seed=5)
        dom = bench.domain([DiskSpec("sda", "sata", "qcow2", args.size)], {"sda": raw})
        raw.unlink()
        for label, extra in (("uncompressed", []), ("lz4", ["-z"])):
            base = [*bench_cmd(dom, work / f"plain-{label}"), *extra]
            enc = [*bench_cmd(dom, work / f"enc-{label}"), *extra, "--key-file", str(key)]
            results[f"backup_{label}"] = pair(f"backup {label}", args.rounds, base, enc,
                                              (work / f"plain-{label}", work / f"enc-{label}"), dom=dom)
            out = work / "restored"
            results[f"restore_{label}"] = pair(
                f"restore {label}", args.rounds,
                [*RESTORE, "-n", "-i", str(work / f"plain-{label}"), "-o", str(out), "--format", "raw"],
                [*RESTORE, "-n", "-i", str(work / f"enc-{label}"), "-o", str(out), "--format", "raw",
                 "--key-file", str(key)], (out, out), dom=dom,
                inputs=(work / f"plain-{label}", work / f"enc-{label}"))
        print(json.dumps(results, indent=1, sort_keys=True))
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def bench_cmd(dom: object, folder: Path) -> list[str]:
    return [sys.executable, str(REPO / "virtnbdbackup"), "-d", dom.name, "-l", "copy", "-o", str(folder),  # type: ignore[attr-defined]
            "-n", "--no-freeze", "--scratchdir", str(dom.dir)]  # type: ignore[attr-defined]


if __name__ == "__main__":
    sys.exit(main())
