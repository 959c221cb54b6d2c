#!/usr/bin/env python3
"""qcow2 set benchmark (-t qcow2, pull mode) against references measured in the same run.

Same disk as bench/bench_backup.py (4 GiB qcow2 disk, 1.5 GiB incompressible data, running domain):

  * full -t qcow2 ÷ ``nbdcopy --flush`` of the same pull export into a sparse file   (target <= 1.25)
  * what the integrity hashing adds: xxh3-128 of the finished image's regions from the page cache, timed
    alone, ÷ the backup (an upper bound: the pull writer hashes the bytes in memory as it writes them)
  * verify of the qcow2 point (``virtnbdrestore -a verify``) ÷ ``cat`` of its files   (target <= 1.5)
  * for scale: the stream set's full (-t stream) ÷ the same nbdcopy

Caches of the source image and of the set's files are dropped before each timed run.

    .venv/bin/python bench/bench_qcow2.py [--size 4G] [--data 1536M] [--rounds 3] [--baseline DIR]

``--baseline DIR``: another checkout (e.g. ``git worktree add /tmp/base main``) runs the same full
and verify in every round, so a change is measured against what it replaces under the same load.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_backup import Bench, GiB, MiB, _bench_env, _drop_caches, make_raw, parse_size  # noqa: E402
from tests.lab.libvirt_lab import DiskSpec, LabDomain, make_lab_dir  # noqa: E402
from virtnbd.backupset.qcow2integrity import image_integrity  # noqa: E402

RESTORE = [sys.executable, str(REPO / "virtnbdrestore")]


def drop_files(paths: list[Path]) -> None:
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(cmd: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=_bench_env())
    return time.monotonic() - started


def children_cpu() -> float:
    """user+sys seconds of every child process reaped so far (and of their reaped children)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_of(run: Any) -> tuple[Any, float]:
    """(result of ``run()``, user+sys CPU seconds of the child processes it ran)."""
    before = children_cpu()
    result = run()
    return result, children_cpu() - before


def round_qcow2(bench: Bench, dom: LabDomain, n: int) -> dict[str, float]:
    ref, ref_cpu = cpu_of(lambda: bench.nbdcopy(dom, "sda"))
    folder = dom.dir / f"bk-qcow2-{n}"
    (secs, summary, peak), qcow2_cpu = cpu_of(lambda: bench.backup(dom, "full", folder, "-t", "qcow2"))
    images = sorted(folder.glob("*.qcow2"))
    subprocess.run(["cat", *map(str, images)], check=True, stdout=subprocess.DEVNULL)     # warm
    started = time.monotonic()                  # the hashing alone: an upper bound of what the writer
    image_integrity(str(images[0]))             # spends (it hashes the bytes in memory as it writes them)
    hashing = time.monotonic() - started
    drop_files(images)
    cat, cat_cpu = cpu_of(lambda: timed(["cat", *map(str, images)]))
    drop_files(images)
    verify, verify_cpu = cpu_of(lambda: timed([*RESTORE, "-n", "-i", str(folder), "-a", "verify"]))
    stream_folder = dom.dir / f"bk-stream-{n}"
    _drop_caches(dom)
    stream_secs, _s, _p = bench.backup(dom, "full", stream_folder)
    shutil.rmtree(folder)
    shutil.rmtree(stream_folder)
    row = {"qcow2_s": secs, "nbdcopy_s": ref, "full_ratio": secs / ref, "hash_s": hashing,
           "hash_share": hashing / secs, "verify_s": verify, "cat_s": cat, "verify_ratio": verify / cat,
           "stream_ratio": stream_secs / ref, "rss_mib": peak / 1024,
           "image_mib": summary["bytes_written"] / MiB, "qcow2_cpu": qcow2_cpu, "nbdcopy_cpu": ref_cpu,
           "verify_cpu": verify_cpu, "cat_cpu": cat_cpu, "load1": os.getloadavg()[0]}
    print("  round {}: qcow2 {qcow2_s:.2f}s nbdcopy {nbdcopy_s:.2f}s ratio {full_ratio:.2f} | hashing {hash_s:.2f}s "
          "({hash_share:.0%} of the backup) | verify {verify_s:.2f}s cat {cat_s:.2f}s ratio {verify_ratio:.2f} | "
          "stream full ratio {stream_ratio:.2f} | image {image_mib:.0f} MiB, rss {rss_mib:.0f} MiB\n"
          "    cpu user+sys: qcow2 {qcow2_cpu:.2f}s nbdcopy {nbdcopy_cpu:.2f}s verify {verify_cpu:.2f}s "
          "cat {cat_cpu:.2f}s | load {load1:.2f}".format(n, **row),
          flush=True)
    return row


def baseline_round(bench: Bench, dom: LabDomain, n: int, tree: Path, row: dict[str, float]) -> dict[str, float]:
    """The same full and verify run by the checkout ``tree`` (``--baseline``), in the same round."""
    from bench import bench_backup
    saved = bench_backup.BACKUP
    bench_backup.BACKUP = [sys.executable, str(tree / "virtnbdbackup")]
    folder = dom.dir / f"bk-base-{n}"
    try:
        (secs, _summary, _peak), cpu = cpu_of(lambda: bench.backup(dom, "full", folder, "-t", "qcow2"))
    finally:
        bench_backup.BACKUP = saved
    images = sorted(folder.glob("*.qcow2"))
    drop_files(images)
    verify, verify_cpu = cpu_of(lambda: timed([sys.executable, str(tree / "virtnbdrestore"), "-n", "-i", str(folder),
                                                "-a", "verify"]))
    shutil.rmtree(folder)
    base = {"base_full_ratio": secs / row["nbdcopy_s"], "base_qcow2_cpu": cpu,
            "base_verify_ratio": verify / row["cat_s"], "base_verify_cpu": verify_cpu}
    print("    baseline {}: full ratio {base_full_ratio:.2f} cpu {base_qcow2_cpu:.2f}s | verify ratio "
          "{base_verify_ratio:.2f} cpu {base_verify_cpu:.2f}s".format(tree, **base), flush=True)
    return base


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=4 * GiB)
    p.add_argument("--data", type=parse_size, default=1536 * MiB)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                   help="another checkout whose full and verify run in the same rounds")
    args = p.parse_args()
    bench = Bench(args)
    work = make_lab_dir(prefix="bench-qcow2-")
    rows = []
    try:
        raw = Path(work) / "random.raw"
        make_raw(raw, args.size, args.data, "random", seed=1)
        dom = bench.domain([DiskSpec("sda", "sata", "qcow2", args.size)], {"sda": raw})
        raw.unlink()
        for n in range(args.rounds):
            row = round_qcow2(bench, dom, n)
            if args.baseline is not None:
                row.update(baseline_round(bench, dom, n, args.baseline.resolve(), row))
            rows.append(row)
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    summary = {key: {"median": round(statistics.median(r[key] for r in rows), 3),
                     "min": round(min(r[key] for r in rows), 3), "max": round(max(r[key] for r in rows), 3)}
               for key in rows[0]}
    print(json.dumps(summary, indent=1))
    full, verify = summary["full_ratio"]["median"], summary["verify_ratio"]["median"]
    print(f"full -t qcow2 / nbdcopy: {full:.2f} (target <= 1.25) {'ok' if full <= 1.25 else 'OVER'}")
    print(f"verify / cat: {verify:.2f} (target <= 1.5) {'ok' if verify <= 1.5 else 'OVER'}")
    return 0 if full <= 1.25 and verify <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
