#!/usr/bin/env python3
"""Push-mode benchmark: ``virtnbdbackup -t qcow2 --push`` against references measured in the same run.

Same disk as bench/bench_backup.py (4 GiB qcow2 disk, 1.5 GiB incompressible data, running domain).
Each round, paired, caches of the source image dropped before each timed run:

  * ``nbdcopy --flush`` of a fresh pull export into a sparse file          (the reference)
  * full ``-t qcow2 --push``, start to exit                                 ÷ nbdcopy
  * of that: QEMU's push job alone (``push.job_seconds`` of --json)         ÷ nbdcopy
  * of that: flush + integrity hashing of the pushed image (``push.hash_seconds``) ÷ the run
  * the hashing of the integrity records alone (timed again on the warm image) ÷ the run
  * full ``-t qcow2`` in pull mode (our NBD reader), start to exit          ÷ nbdcopy (for the choice)
  * full ``-t stream`` (the default), start to exit                         ÷ nbdcopy (for the choice)
  * the pushed image's allocation (``du``) against the data: push output stays thin

    .venv/bin/python bench/bench_push.py [--size 4G] [--data 1536M] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_backup import Bench, GiB, MiB, make_raw, parse_size  # noqa: E402
from tests.lab.libvirt_lab import DiskSpec, LabDomain, make_lab_dir  # noqa: E402
from virtnbd.backupset.qcow2integrity import image_integrity  # noqa: E402


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def one_round(bench: Bench, dom: LabDomain, n: int) -> dict[str, float]:
    ref = bench.nbdcopy(dom, "sda")
    folder = dom.dir / f"bk-push-{n}"
    secs, summary, _peak = bench.backup(dom, "full", folder, "-t", "qcow2", "--push")
    image = folder / "sda.virtnbdbackup.0.qcow2"
    alloc = allocated(image)
    started = time.monotonic()                   # the region hashing alone, warm file, as in the run
    image_integrity(str(image))
    hash_alone = time.monotonic() - started
    shutil.rmtree(folder)
    pull_folder = dom.dir / f"bk-pull-{n}"
    pull, _s, _p = bench.backup(dom, "full", pull_folder, "-t", "qcow2")
    shutil.rmtree(pull_folder)
    stream_folder = dom.dir / f"bk-stream-{n}"
    stream, _s, _p = bench.backup(dom, "full", stream_folder)
    shutil.rmtree(stream_folder)
    row = {"stream_s": stream, "nbdcopy_s": ref, "push_s": secs, "job_s": summary["push"]["job_seconds"],
           "hash_s": summary["push"]["hash_seconds"], "sha_s": hash_alone, "pull_s": pull, "alloc_mib": alloc / MiB}
    print(f"  round {n}: nbdcopy {ref:.2f}s  push {secs:.2f}s (job {row['job_s']:.2f}s, flush+hash "
          f"{row['hash_s']:.2f}s, hashing alone {hash_alone:.2f}s)  pull -t qcow2 {pull:.2f}s  "
          f"pull -t stream {stream:.2f}s  "
          f"pushed image {alloc / MiB:.0f} MiB allocated",
          flush=True)
    return row


def summarize(rows: list[dict[str, float]], data: int) -> dict[str, float]:
    def med(f: object) -> float:
        return round(statistics.median(f(r) for r in rows), 3)  # type: ignore[operator]
    return {
        "push_over_nbdcopy": med(lambda r: r["push_s"] / r["nbdcopy_s"]),
        "push_job_over_nbdcopy": med(lambda r: r["job_s"] / r["nbdcopy_s"]),
        "push_hash_share": med(lambda r: r["hash_s"] / r["push_s"]),
        "hashing_alone_share": med(lambda r: r["sha_s"] / r["push_s"]),
        "pull_qcow2_over_nbdcopy": med(lambda r: r["pull_s"] / r["nbdcopy_s"]),
        "push_over_pull": med(lambda r: r["push_s"] / r["pull_s"]),
        "pull_stream_over_nbdcopy": med(lambda r: r["stream_s"] / r["nbdcopy_s"]),
        "nbdcopy_s": med(lambda r: r["nbdcopy_s"]), "push_s": med(lambda r: r["push_s"]),
        "hash_s": med(lambda r: r["hash_s"]), "pull_s": med(lambda r: r["pull_s"]),
        "pushed_alloc_over_data": med(lambda r: r["alloc_mib"] * MiB / data),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=4 * GiB)
    ap.add_argument("--data", type=parse_size, default=1536 * MiB)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    bench = Bench(args)
    try:
        raw = Path(make_lab_dir(prefix="bench-push-")) / "random.raw"
        make_raw(raw, args.size, args.data, "random", seed=1)
        dom = bench.domain([DiskSpec("sda", "sata", "qcow2", args.size)], {"sda": raw})
        shutil.rmtree(raw.parent, ignore_errors=True)
        rows = [one_round(bench, dom, n) for n in range(args.rounds)]
        result = summarize(rows, args.data)
    finally:
        bench.close()
    print(json.dumps(result, indent=1))
    print(f"push full / nbdcopy: {result['push_over_nbdcopy']:.2f} (QEMU's job alone "
          f"{result['push_job_over_nbdcopy']:.2f}); flush+hash {result['push_hash_share'] * 100:.0f}% of the push "
          f"run; pull -t qcow2 / nbdcopy {result['pull_qcow2_over_nbdcopy']:.2f}; pull -t stream / nbdcopy "
          f"{result['pull_stream_over_nbdcopy']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
