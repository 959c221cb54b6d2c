#!/usr/bin/env python3
"""RBD restore benchmark: virtnbdrestore --target rbd: against qemu-img convert into rbd:, in the same run.

Uses bench_restore.py's synthetic benchmark backup (4 GiB virtual, ~1.5 GiB
incompressible data in 1-256 MiB extents, 1 MiB frames) and its reference raw
image holding the same final content. A throw-away Ceph cluster (memstore OSD,
sized for the data) is started for the run and stopped at the end.

Ratio printed (target in brackets):
  restore into RBD / qemu-img convert -W raw -> rbd:      [<= 1.25]
The first restore is checked byte by byte against the reference (qemu-img
compare) and for thinness (rbd du).

Usage: .venv/bin/python bench/bench_rbd.py [--size GiB] [--data GiB] [--repeat N] [--dir DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import bench_restore  # noqa: E402

from tests.lab import ceph_lab  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
RESTORE = [sys.executable, os.path.join(ROOT, "virtnbdrestore")]


CPU: dict[str, list[float]] = {}


def timed(argv: list[str], env: dict[str, str] | None = None, key: str = "") -> float:
    """Wall time of one command; its CPU time (user + sys) is recorded under ``key``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False, env=env)
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU.setdefault(key, []).append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(argv)}\n{proc.stderr}")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=4.0, help="virtual size in GiB (default 4)")
    ap.add_argument("--data", type=float, default=1.5, help="data in GiB (default 1.5)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--dir", default="/var/tmp/vnbd-bench-rbd")
    ap.add_argument("--keep", action="store_true", help="keep the generated set")
    args = ap.parse_args()
    size, data = int(args.size * GiB), int(args.data * GiB)
    bench_restore.drop(args.dir)
    os.makedirs(args.dir)
    t0 = time.perf_counter()
    paths = bench_restore.build(os.path.join(args.dir, "sets"), size=size, data=data, incs=1, change=32 * MiB)
    print(f"built the benchmark set in {time.perf_counter() - t0:.1f} s")
    # memstore holds every object in RAM: room for two restored images plus slack
    memstore = int(2.5 * data) + 512 * MiB
    results: dict[str, list[float]] = {}
    try:
        with ceph_lab.running_cluster(memstore_bytes=memstore, folder=os.path.join(args.dir, "ceph")) as c:
            print(f"ceph cluster up ({memstore // MiB} MiB memstore)")
            ceph = ["--ceph-conf", str(c.conf), "--ceph-id", c.client_id, "--ceph-keyring", str(c.keyring)]
            convert = ["qemu-img", "convert", "-W", "-f", "raw", "-O", "raw", paths["ref"], c.rbd_spec("ref")]
            restore = [*RESTORE, "-i", paths["main"], "--target", f"rbd:{c.pool}/restored", "-n",
                       "-w", str(args.workers), *ceph]
            # like an installed package: byte code compiled once (run 0), kept outside the source tree
            env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
            env["PYTHONPYCACHEPREFIX"] = os.path.join(args.dir, "pycache")
            for n in range(args.repeat + 1):          # run 0 warms the page cache and the OSD: not counted
                for key, argv, image in (("qemu-img convert", convert, "ref"), ("virtnbdrestore", restore, "restored")):
                    secs = timed(argv, env, key if n else "")
                    if n:
                        results.setdefault(key, []).append(secs)
                    elif image == "restored":
                        check(c, paths["ref"], data)
                    c.rbd("rm", "--no-progress", f"{c.pool}/{image}")
    finally:
        if not args.keep:
            bench_restore.drop(args.dir)
    med = {k: statistics.median(v) for k, v in results.items()}
    for k, v in med.items():
        print(f"{k:18s} {v:7.2f} s   (runs: {', '.join(f'{x:.2f}' for x in results[k])})")
    cpu = {k: statistics.median(v) for k, v in CPU.items() if k}
    print(f"info: CPU of the command itself (median): restore {cpu['virtnbdrestore']:.2f} s, "
          f"qemu-img {cpu['qemu-img convert']:.2f} s (the OSD's CPU is not counted)")
    ratio = med["virtnbdrestore"] / med["qemu-img convert"]
    best = min(results["virtnbdrestore"]) / min(results["qemu-img convert"])
    print(f"info: best run / best run: {best:.2f}; load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          f"(the memstore OSD shares the CPUs with both commands)")
    ok = ratio <= 1.25
    flag = "ok" if ok else "OVER"
    print(f"RATIO restore into RBD / qemu-img convert raw -> rbd: {ratio:.2f} (target <= 1.25) {flag}")
    return 0 if ok else 1


def check(c: ceph_lab.CephCluster, reference: str, data: int) -> None:
    proc = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", c.rbd_spec("restored"), reference],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"restored image differs from the reference: {proc.stdout}{proc.stderr}")
    used = json.loads(c.rbd("du", "--format", "json", f"{c.pool}/restored"))["images"][0]["used_size"]
    print(f"check: restored image identical to the reference; rbd du {used // MiB} MiB used for "
          f"{data // MiB} MiB data")
    if used > data + 256 * MiB:
        raise SystemExit("restored image is not thin")


if __name__ == "__main__":
    sys.exit(main())
