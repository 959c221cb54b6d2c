#!/usr/bin/env python3
"""Object-storage benchmark: virtnbdrestore from s3:// against boto3 download_file of the same bytes.

Needs a running S3 endpoint with its credentials in the environment, e.g. the lab's RGW:
    scripts/lab/rgw start /tmp/rgw && . /tmp/rgw/s3.env && .venv/bin/python bench/bench_s3.py
Builds a synthetic set (one full, incompressible 1 MiB frames), uploads it through the set's
store (multipart, as a backup would) and measures in the same run, paired rounds:
  upload (store.create)  / boto3 upload_file of a local file of the same size   [<= 1.3]
  restore from s3 (raw) / boto3 download_file of the same object               [<= 1.3]
  peak RSS of virtnbdrestore                                                   [<= 128 MiB]
  requests per GiB (upload and restore)
With --backup-mib N (needs the libvirt lab): a running domain with N MiB of random data,
  virtnbdbackup -l copy -o s3://… / boto3 upload_file of a file of the same stored size,
  same part size and concurrency                                                [<= 1.3]
  peak RSS of virtnbdbackup (os.wait4: the child alone)                          [<= 128 MiB]
"""
from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tests.functional.restore_sets import SetBuilder  # noqa: E402
from virtnbd.backupset.s3store import ObjectStore  # noqa: E402

MiB = 1 << 20


def _upload(folder: str, store: ObjectStore) -> float:
    t0 = time.monotonic()
    for name in sorted(os.listdir(folder), key=lambda n: n == "virtnbd.manifest.json"):
        path = os.path.join(folder, name)
        if name.startswith("shadow.") or not os.path.isfile(path):
            continue
        with open(path, "rb") as src, store.create(name) as dst:
            while chunk := src.read(4 * MiB):
                dst.write(chunk)
    return time.monotonic() - t0


def _peak_rss(cmd: list[str], **kwargs: Any) -> tuple[float, int]:
    """(seconds, peak RSS MiB) of ``cmd`` run under /usr/bin/time -f %M. Not RUSAGE_CHILDREN nor
    wait4: Linux counts into a child's maxrss the memory of the process it was forked from, up to
    its exec (the bench itself, hundreds of MiB); time(1) is small, so its child starts small."""
    with tempfile.NamedTemporaryFile("r") as rss:
        t0 = time.monotonic()
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd], check=True, **kwargs)
        seconds = time.monotonic() - t0
        return seconds, int(rss.read().split()[-1]) // 1024


def _restore(url: str, out: str) -> tuple[float, int]:
    """Seconds and the restore's own peak RSS in MiB."""
    return _peak_rss([os.path.join(ROOT, ".venv/bin/virtnbdrestore"), "-i", url, "-o", out, "-n", "--format", "raw"])


def _backup_to_s3(dom: Any, url: str, env: dict[str, str]) -> tuple[float, int, int]:
    """(seconds, stored bytes, peak RSS MiB) of one virtnbdbackup -l copy into ``url``."""
    import json

    cmd = [os.path.join(ROOT, ".venv/bin/virtnbdbackup"), "-d", dom.name, "-l", "copy", "-o", url,
           "-n", "--json", "--no-freeze", "--scratchdir", str(dom.dir)]
    with tempfile.TemporaryFile() as out:
        seconds, rss = _peak_rss(cmd, stdout=out, env=env)
        out.seek(0)
        summary = json.loads(out.read())
    return seconds, int(summary["bytes_written"]), rss


def backup_rounds(mib: int, rounds: int, store: ObjectStore, *, bucket: str, cfg: object, work: str) -> None:
    """Backup of a real domain into the bucket vs boto3 upload_file of the same number of bytes."""
    from bench.bench_backup import Bench, _bench_env, make_raw
    from tests.lab.libvirt_lab import DiskSpec

    bench = Bench(argparse.Namespace(rounds=rounds))
    try:
        raw = os.path.join(work, "disk.raw")
        make_raw(Path(raw), 2 * mib * MiB, mib * MiB, "random", seed=1)
        dom = bench.domain([DiskSpec("sda", "sata", "qcow2", 2 * mib * MiB)], {"sda": Path(raw)})
        os.unlink(raw)
        ours, refs, peak = [], [], 0
        for r in range(rounds):
            secs, stored, rss = _backup_to_s3(dom, f"s3://{bucket}/bk{r}", _bench_env())
            ours.append(secs)
            peak = max(peak, rss)
            ref = os.path.join(work, "ref.bin")
            with open(ref, "wb") as f:
                f.write(os.urandom(stored))
            t0 = time.monotonic()
            store.client.upload_file(ref, bucket, f"refbk/{r}", Config=cfg)
            refs.append(time.monotonic() - t0)
            os.unlink(ref)
        ratios = [o / r for o, r in zip(ours, refs, strict=True)]
        print(f"backup  {statistics.median(ours):.2f} s / boto3 upload_file {statistics.median(refs):.2f} s "
              f"= {statistics.median(ratios):.2f} (range {min(ratios):.2f}-{max(ratios):.2f})  [<= 1.3]")
        print(f"peak RSS of virtnbdbackup: {peak} MiB  [<= 128]")
    finally:
        bench.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512, help="data in the set (MiB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backup-mib", type=int, default=0, help="also back up a real domain with this much data")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="vnbd-bench-s3-")
    bucket = f"vnbd-bench-{secrets.token_hex(3)}"
    try:
        b = SetBuilder(os.path.join(work, "set"), size=args.mib * MiB * 2, cluster=MiB)
        b.scribble(args.mib, zero_share=0.0)
        b.full()
        data = next(n for n in os.listdir(b.folder) if n.endswith(".data"))
        size = os.path.getsize(os.path.join(b.folder, data))
        store = ObjectStore(f"s3://{bucket}/vm")
        store.client.create_bucket(Bucket=bucket)
        from boto3.s3.transfer import TransferConfig
        cfg = TransferConfig(multipart_chunksize=8 * MiB, max_concurrency=store.options.concurrency)
        ups, refs_up, rest, refs_down, rss = [], [], [], [], 0
        for r in range(args.rounds):
            before = dict(store.requests.counts)
            ups.append(_upload(b.folder, store))
            up_requests = sum(store.requests.counts.values()) - sum(before.values())
            t0 = time.monotonic()
            store.client.upload_file(os.path.join(b.folder, data), bucket, f"ref/{data}", Config=cfg)
            refs_up.append(time.monotonic() - t0)
            out = os.path.join(work, f"out{r}")
            secs, rss = _restore(str(store.url), out)
            rest.append(secs)
            shutil.rmtree(out)
            t0 = time.monotonic()
            store.client.download_file(bucket, f"ref/{data}", os.path.join(work, "ref.data"), Config=cfg)
            refs_down.append(time.monotonic() - t0)
            os.unlink(os.path.join(work, "ref.data"))
        gib = size / (1 << 30)
        print(f"set: {size / MiB:.0f} MiB stored, {args.rounds} paired rounds")
        print(f"upload  {statistics.median(ups):.2f} s / boto3 upload_file {statistics.median(refs_up):.2f} s "
              f"= {statistics.median(u / r for u, r in zip(ups, refs_up, strict=True)):.2f}  [<= 1.3]")
        print(f"restore {statistics.median(rest):.2f} s / boto3 download_file {statistics.median(refs_down):.2f} s "
              f"= {statistics.median(u / r for u, r in zip(rest, refs_down, strict=True)):.2f}  [<= 1.3]")
        print(f"peak RSS of virtnbdrestore: {rss} MiB  [<= 128]")
        print(f"requests per GiB: upload {up_requests / gib:.0f}")
        if args.backup_mib:
            backup_rounds(args.backup_mib, args.rounds, store, bucket=bucket, cfg=cfg, work=work)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
