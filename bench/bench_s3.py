#!/usr/bin/env python3
"""Object-storage benchmark: virtnbd against boto3's own transfers of the same bytes, same RGW, same run.

Needs a running S3 endpoint with its credentials in the environment, e.g. the lab's RGW:
    scripts/lab/rgw start /tmp/rgw && . /tmp/rgw/s3.env && .venv/bin/python bench/bench_s3.py
Builds a synthetic set (one full, incompressible 1 MiB frames), uploads it through the set's
store (multipart, as a backup would) and measures, in paired rounds of one run:
  restore from s3 (raw) / boto3 download_file of the same object               [<= 1.3]
  peak RSS of virtnbdrestore                                                   [<= 128 MiB]
With --backup-mib N (needs the libvirt lab): a running domain with N MiB of random data,
  virtnbdbackup -l copy -o s3://… / boto3 upload_file of a file of the same stored size,
  same part size and concurrency                                                [<= 1.3]
  peak RSS of virtnbdbackup                                                     [<= 128 MiB]
Both sides are commands run the same way (/usr/bin/time: wall, user+sys CPU, peak RSS; the
reference is a small python process calling boto3's TransferManager with a TransferConfig of the
store's part size and concurrency), so start-up (imports, client) counts on both sides.
Requests per GiB come from the commands' own count (their -v line "S3 requests: ...").
The bucket is emptied and removed at the end, also when a round fails.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench.bench_backup import _bench_env  # noqa: E402
from tests.functional.restore_sets import SetBuilder  # noqa: E402
from virtnbd.backupset import s3store  # noqa: E402
from virtnbd.backupset.s3store import ObjectStore  # noqa: E402

MiB = 1 << 20
PY = os.path.join(ROOT, ".venv/bin/python")

# boto3's managed transfer, as a user of the SDK would call it (the reference)
REFERENCE = """
import os, sys, boto3
from boto3.s3.transfer import TransferConfig
op, path, bucket, key, part, conc = sys.argv[1:7]
cfg = TransferConfig(multipart_threshold=int(part), multipart_chunksize=int(part), max_concurrency=int(conc))
s3 = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))  # botocore < 1.31 does not read it
if op == "up":
    s3.upload_file(path, bucket, key, Config=cfg)
else:
    s3.download_file(bucket, key, path, Config=cfg)
"""


@dataclass(frozen=True)
class Run:
    seconds: float
    cpu: float          # user + sys
    rss: int            # peak, MiB
    err: str


def _timed(cmd: list[str], env: dict[str, str], **kwargs: Any) -> Run:
    """Wall time, CPU time and peak RSS of ``cmd`` under /usr/bin/time (its child alone: a child
    forked from this big process would count the parent's memory up to its exec)."""
    with tempfile.NamedTemporaryFile("r") as out:
        t0 = time.monotonic()
        done = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", "-o", out.name, *cmd], env=env,
                              stderr=subprocess.PIPE, text=True, check=False, **kwargs)
        seconds = time.monotonic() - t0
        user, system, rss = out.read().split()[-3:]
    if done.returncode:
        raise SystemExit(f"{cmd[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return Run(seconds, float(user) + float(system), int(rss) // 1024, done.stderr)


def _reference(op: str, path: str, bucket: str, key: str, env: dict[str, str]) -> Run:
    opts = s3store.S3Options()
    return _timed([PY, "-c", REFERENCE, op, path, bucket, key, str(s3store.MIN_PART), str(opts.concurrency)], env)


def _requests(stderr: str) -> int:
    found = re.findall(r"S3 requests: (\d+)", stderr)
    return sum(int(n) for n in found)


def _upload(folder: str, store: ObjectStore) -> None:
    for name in sorted(os.listdir(folder), key=lambda n: n == "virtnbd.manifest.json"):
        path = os.path.join(folder, name)
        if name.startswith("shadow.") or not os.path.isfile(path):
            continue
        with open(path, "rb") as src, store.create(name) as dst:
            while chunk := src.read(4 * MiB):
                dst.write(chunk)


def _report(what: str, ours: list[Run], refs: list[Run], ref_name: str, gib: float) -> None:
    ratios = [o.seconds / r.seconds for o, r in zip(ours, refs, strict=True)]
    cpu = [o.cpu / r.cpu for o, r in zip(ours, refs, strict=True)]
    med = statistics.median
    print(f"{what:8} {med(o.seconds for o in ours):.2f} s (cpu {med(o.cpu for o in ours):.2f} s) / {ref_name} "
          f"{med(r.seconds for r in refs):.2f} s (cpu {med(r.cpu for r in refs):.2f} s) = {med(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}; cpu ratio {med(cpu):.2f})  [<= 1.3]")
    print(f"{'':8} peak RSS {max(o.rss for o in ours)} MiB (reference {max(r.rss for r in refs)} MiB)  [<= 128]; "
          f"requests per GiB {_requests(ours[-1].err) / gib:.0f}")


def restore_rounds(args: argparse.Namespace, bucket: str, work: str) -> None:
    b = SetBuilder(os.path.join(work, "set"), size=args.mib * MiB * 2, cluster=MiB)
    b.scribble(args.mib, zero_share=0.0)
    b.full()
    data = next(n for n in os.listdir(b.folder) if n.endswith(".data"))
    size = os.path.getsize(os.path.join(b.folder, data))
    store = ObjectStore(f"s3://{bucket}/vm")
    _upload(b.folder, store)
    store.client.upload_file(os.path.join(b.folder, data), bucket, f"ref/{data}")
    shutil.rmtree(b.folder)
    env, ours, refs = _bench_env(), [], []
    restore = os.path.join(ROOT, ".venv/bin/virtnbdrestore")
    for r in range(args.rounds):
        out = os.path.join(work, f"out{r}")
        ours.append(_timed([restore, "-v", "-i", str(store.url), "-o", out, "-n", "--format", "raw"], env))
        shutil.rmtree(out)
        refs.append(_reference("down", os.path.join(work, "ref.data"), bucket, f"ref/{data}", env))
        os.unlink(os.path.join(work, "ref.data"))
    remove_objects(store.client, bucket)
    print(f"set: {size / MiB:.0f} MiB stored, {args.rounds} paired rounds")
    _report("restore", ours, refs, "boto3 download_file", size / (1 << 30))


def backup_rounds(args: argparse.Namespace, bucket: str, work: str) -> None:
    """Backup of a real domain into the bucket vs boto3 upload_file of the same number of bytes."""
    from bench.bench_backup import Bench, make_raw
    from tests.lab.libvirt_lab import DiskSpec

    mib = args.backup_mib
    bench = Bench(argparse.Namespace(rounds=args.rounds))
    try:
        raw = os.path.join(work, "disk.raw")
        make_raw(Path(raw), 2 * mib * MiB, mib * MiB, "random", seed=1)
        dom = bench.domain([DiskSpec("sda", "sata", "qcow2", 2 * mib * MiB)], {"sda": Path(raw)})
        os.unlink(raw)
        env, ours, refs, stored = _bench_env(), [], [], 0
        store_client = s3store.make_client(s3store.S3Options())
        for r in range(args.rounds):
            cmd = [os.path.join(ROOT, ".venv/bin/virtnbdbackup"), "-v", "-d", dom.name, "-l", "copy",
                   "-o", f"s3://{bucket}/bk{r}", "-n", "--json", "--no-freeze", "--scratchdir", str(dom.dir)]
            with tempfile.TemporaryFile("w+") as out:
                ours.append(_timed(cmd, env, stdout=out))
                out.seek(0)
                stored = int(json.loads(out.read())["bytes_written"])
            ref = os.path.join(work, "ref.bin")
            with open(ref, "wb") as f:
                for _ in range(0, stored, 16 * MiB):
                    f.write(os.urandom(min(16 * MiB, stored - f.tell())))
            refs.append(_reference("up", ref, bucket, f"refbk/{r}", env))
            os.unlink(ref)
            remove_objects(store_client, bucket, f"bk{r}/")      # each round's GiBs go before the next
            remove_objects(store_client, bucket, f"refbk/{r}")
        print(f"backup: {stored / MiB:.0f} MiB stored, {args.rounds} paired rounds")
        _report("backup", ours, refs, "boto3 upload_file", stored / (1 << 30))
    finally:
        bench.close()


def remove_objects(client: Any, bucket: str, prefix: str = "") -> None:
    """Abort the uploads and delete the objects below ``prefix`` (the lab's memstore is RAM)."""
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket, Prefix=prefix):
        for up in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(f"bench_s3: signal {signum}")      # SIGTERM too runs the cleanup below


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512, help="data in the restored set (MiB); 0: no restore rounds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backup-mib", type=int, default=0, help="also back up a real domain with this much data")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="vnbd-bench-s3-")
    bucket = f"vnbd-bench-{secrets.token_hex(3)}"
    client = s3store.make_client(s3store.S3Options())
    signal.signal(signal.SIGTERM, _terminate)
    client.create_bucket(Bucket=bucket)
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    try:
        if args.mib:
            restore_rounds(args, bucket, work)
        if args.backup_mib:
            backup_rounds(args, bucket, work)
        return 0
    finally:
        print(f"load average at end: {os.getloadavg()[0]:.2f}")
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(Exception):      # report the round's error, not a cleanup one
            remove_objects(client, bucket)
            client.delete_bucket(Bucket=bucket)


if __name__ == "__main__":
    sys.exit(main())
