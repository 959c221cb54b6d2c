#!/usr/bin/env python3
"""Backup benchmark: virtnbdbackup against nbdcopy on the same running domain and export.

Not a test: prints ratios against a reference measured in the same run: the median
of paired rounds and best-of-ours / best-of-nbdcopy (robust when other work shares
the machine's disk and cores).

    .venv/bin/python bench/bench_backup.py [--size 4G] [--data 1536M] [--rounds 3] [--skip-big]

Scenarios (each repeated ``--rounds`` times, medians, paired with the reference):
  * full, uncompressed, incompressible data   / nbdcopy --flush of the export into a sparse file
  * full, lz4, incompressible data            / same nbdcopy
  * full, lz4, compressible text              / nbdcopy of the text export
  * inc after 64 MiB of scattered changes: bytes read vs dirty bytes
  * fixed cost: inc with no change, start to exit
  * peak RSS of the backup process, also on a 64 GiB sparse disk
  * --only frag: full of issue 19's fragmented disk (200 000 extents of 4 KiB, one every 8 KiB,
    4 KiB qcow2 clusters) / nbdcopy --flush
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import libvirt  # noqa: E402

from tests.lab.libvirt_lab import DiskSpec, LabDomain, make_lab_dir  # noqa: E402
from virtnbd.virt import connection, xmlbuild  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
BACKUP = [sys.executable, str(REPO / "virtnbdbackup")]
WORDS = ("backup restore libvirt domain checkpoint bitmap export stream frame extent qemu guest agent "
         "virtual machine block device cluster allocation incremental differential chain manifest").split()


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def text_block(rng: random.Random, length: int) -> bytes:
    lines = []
    size = 0
    while size < length:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + f" {rng.randint(0, 99999)}\n"
        lines.append(line)
        size += len(line)
    return "".join(lines).encode()[:length]


def make_raw(path: Path, size: int, data: int, kind: str, seed: int) -> list[tuple[int, int]]:
    """Sparse raw file with ``data`` bytes in extents of 1-256 MiB at random offsets."""
    rng = random.Random(seed)
    extents = []
    remaining = data
    slots = size // MiB
    used: set[int] = set()
    while remaining > 0:
        length = min(remaining, rng.choice([1, 2, 4, 8, 16, 32, 64, 128, 256]) * MiB)
        while True:
            for _ in range(200):
                start = rng.randrange(0, slots - length // MiB)
                if not any(s in used for s in range(start, start + length // MiB)):
                    break
            else:
                if length == MiB:
                    raise RuntimeError("disk too full for the requested data")
                length //= 2
                continue
            break
        used.update(range(start, start + length // MiB))
        extents.append((start * MiB, length))
        remaining -= length
    text_chunk = text_block(rng, 4 * MiB) if kind == "text" else b""
    with path.open("wb") as f:
        f.truncate(size)
        for off, length in sorted(extents):
            f.seek(off)
            done = 0
            while done < length:
                n = min(4 * MiB, length - done)
                if kind == "text":
                    shift = rng.randrange(0, MiB)
                    f.write((text_chunk[shift:] + text_chunk[:shift])[:n])
                else:
                    f.write(os.urandom(n))
                done += n
    return extents


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        # libvirt's event loop answers keepalive: making a disk image can take longer than its timeout
        self._stack = contextlib.ExitStack()
        self.conn: libvirt.virConnect = self._stack.enter_context(connection.connect("qemu:///system"))
        self.domains: list[LabDomain] = []
        self.results: dict[str, object] = {}
        self.last_cpu = 0.0             # user+sys seconds of the last measured child

    def domain(self, specs: list[DiskSpec], images: dict[str, Path], cluster: str = "64k") -> LabDomain:
        name = f"vnbdtest-bench-{uuid.uuid4().hex[:6]}"
        lab_dir = make_lab_dir(prefix=f"{name}-")
        try:
            dom = LabDomain(self.conn, name, lab_dir, specs)
        except BaseException:
            shutil.rmtree(lab_dir, ignore_errors=True)
            raise
        self.domains.append(dom)
        for target, raw in images.items():
            image = dom.disk(target).image
            subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-S", cluster,
                            "-o", f"cluster_size={cluster}", str(raw), str(image)], check=True)
            image.chmod(0o644)
        dom.start()
        return dom

    def close(self) -> None:
        try:
            for dom in self.domains:
                dom.remove()
        finally:
            self._stack.close()

    # -- measurements --------------------------------------------------------------
    def nbdcopy(self, dom: LabDomain, target: str) -> float:
        """Wall time of nbdcopy --flush of a fresh pull-mode export into a sparse file."""
        sock = dom.socket_path("ref")
        scratch = dom.dir / f"ref-{target}.scratch"
        out = dom.dir / "ref-out.raw"
        dom.dom.backupBegin(xmlbuild.backup_xml(str(sock), [xmlbuild.BackupDisk(target, str(scratch))]), None, 0)
        try:
            out.unlink(missing_ok=True)
            with out.open("wb") as f:
                f.truncate(dom.disk(target).size)
            _drop_caches(dom)
            started, cpu0 = time.monotonic(), _children_cpu()
            subprocess.run(["nbdcopy", "--flush", f"nbd+unix:///{target}?socket={sock}", str(out)], check=True)
            self.last_cpu = _children_cpu() - cpu0
            return time.monotonic() - started
        finally:
            dom.dom.abortJob()
            out.unlink(missing_ok=True)

    def backup(self, dom: LabDomain, level: str, folder: Path, *extra: str) -> tuple[float, dict, int]:
        """(wall seconds start to exit, json summary, peak RSS KiB) of one virtnbdbackup run."""
        cmd = [*BACKUP, "-d", dom.name, "-l", level, "-o", str(folder), "-n", "--json", "--no-freeze",
               "--scratchdir", str(dom.dir), *extra]
        _drop_caches(dom)
        out_path, err_path = folder.parent / "bench.out", folder.parent / "bench.err"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            started = time.monotonic()
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=_bench_env())
            _pid, status, usage = os.wait4(proc.pid, 0)
            seconds = time.monotonic() - started
        self.last_cpu = usage.ru_utime + usage.ru_stime
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError(f"backup failed: {err_path.read_text()}")
        return seconds, json.loads(out_path.read_text()), int(usage.ru_maxrss)

    def full_vs_nbdcopy(self, label: str, dom: LabDomain, *extra: str) -> None:
        ratios, ours, refs, rss = [], [], [], []
        for n in range(self.args.rounds):
            ref = self.nbdcopy(dom, "sda")
            ref_cpu = self.last_cpu
            folder = dom.dir / f"bk-{label}-{n}"
            secs, summary, peak = self.backup(dom, "copy", folder, *extra)
            load = os.getloadavg()[0]
            shutil.rmtree(folder)
            ratios.append(secs / ref)
            ours.append(secs)
            refs.append(ref)
            rss.append(peak)
            print(f"  {label} round {n}: ours {secs:.2f}s  nbdcopy {ref:.2f}s  ratio {secs / ref:.2f}  "
                  f"stored {summary['bytes_written'] / MiB:.0f} MiB  rss {peak / 1024:.0f} MiB  "
                  f"cpu ours {self.last_cpu:.2f}s nbdcopy {ref_cpu:.2f}s  load {load:.1f}", flush=True)
        self.results[label] = {"ratio_median": round(statistics.median(ratios), 3),
                               "ratio_best": round(min(ours) / min(refs), 3),
                               "ours_s": round(statistics.median(ours), 3),
                               "nbdcopy_s": round(statistics.median(refs), 3),
                               "peak_rss_mib": round(max(rss) / 1024, 1)}
        print(f"{label}: ratio {statistics.median(ratios):.2f} (median of {len(ratios)} paired rounds), "
              f"best/best {min(ours) / min(refs):.2f}", flush=True)

    def inc_scattered(self, dom: LabDomain) -> None:
        folder = dom.dir / "bk-inc"
        self.backup(dom, "full", folder)
        sda = dom.disk("sda")
        rng = random.Random(7)
        size = sda.size
        dirty = 0
        blocks: set[int] = set()
        while dirty < 64 * MiB:
            length = rng.choice([64, 128, 256, 512]) * 1024
            off = rng.randrange(0, (size - length) // 65536) * 65536
            new = {b for b in range(off // 65536, (off + length) // 65536)} - blocks
            blocks |= new
            dirty += len(new) * 65536
            dom.hmp(f'qemu-io -d {sda.qdev()} "write -P {rng.randrange(1, 255)} {off} {length}"')
        secs, summary, peak = self.backup(dom, "inc", folder)
        read = summary["bytes_read"]
        print(f"inc after {dirty / MiB:.0f} MiB scattered changes: read {read / MiB:.1f} MiB in {secs:.2f}s, "
              f"rss {peak / 1024:.0f} MiB", flush=True)
        times = []
        for _ in range(self.args.rounds):
            secs0, _s, _p = self.backup(dom, "inc", folder)
            times.append(secs0)
        print(f"fixed cost (inc with no changes): median {statistics.median(times):.3f}s", flush=True)
        self.results["inc"] = {"dirty_mib": round(dirty / MiB, 1), "read_mib": round(read / MiB, 1),
                               "read_le_dirty": read <= dirty, "seconds": round(secs, 3),
                               "fixed_cost_s": round(statistics.median(times), 3)}

    def big_sparse(self) -> None:
        raw = Path(make_lab_dir(prefix="bench-big-")) / "big.raw"
        make_raw(raw, 64 * GiB, 256 * MiB, "random", seed=3)
        dom = self.domain([DiskSpec("sda", "sata", "qcow2", 64 * GiB)], {"sda": raw})
        raw.unlink()
        secs, summary, peak = self.backup(dom, "copy", dom.dir / "bk-big")
        print(f"64 GiB sparse disk (256 MiB data): {secs:.2f}s, rss {peak / 1024:.0f} MiB", flush=True)
        self.results["big_sparse"] = {"seconds": round(secs, 3), "peak_rss_mib": round(peak / 1024, 1)}
        shutil.rmtree(raw.parent, ignore_errors=True)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _drop_caches(dom: LabDomain) -> None:
    """Write back dirty pages, then drop the domain's disk images from the page cache
    (posix_fadvise DONTNEED, only these files), so both runs read from the disk."""
    os.sync()
    for disk in dom.disks.values():
        fd = os.open(disk.image, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


RSS_BOUND_MIB = 128


def rss_verdict(results: dict) -> bool:
    """Print the peak RSS of every backup run against the bound README quotes; True when within."""
    peaks = {k: v["peak_rss_mib"] for k, v in results.items() if "peak_rss_mib" in v}
    ok = all(v <= RSS_BOUND_MIB for v in peaks.values())
    for label, mib in peaks.items():
        print(f"RSS {label}: peak {mib:.0f} MiB (bound <= {RSS_BOUND_MIB}) {'ok' if mib <= RSS_BOUND_MIB else 'OVER'}")
    return ok


def _bench_env() -> dict[str, str]:
    """Cache byte code like an installed package would (this environment may set
    PYTHONDONTWRITEBYTECODE, which makes every run recompile ~0.1 s of modules)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = os.path.join(tempfile.gettempdir(), "virtnbd-bench-pycache")
    return env


def make_fragmented(path: Path, extents: int = 200_000, block: int = 4096) -> int:
    """Sparse raw file with ``extents`` random 4 KiB blocks, one every 8 KiB (issue 19's fragmented disk)."""
    size = extents * 2 * block
    with path.open("wb") as f:
        f.truncate(size)
        fd = f.fileno()
        chunk = os.urandom(block * 256)
        for i in range(extents):
            at = (i % 256) * block
            os.pwrite(fd, chunk[at:at + block], i * 2 * block)
    return size


def fragmented(bench: Bench, work: str, extra: list[str]) -> None:
    raw = Path(work) / "frag.raw"
    size = make_fragmented(raw)
    dom = bench.domain([DiskSpec("sda", "sata", "qcow2", size)], {"sda": raw}, cluster="4k")
    raw.unlink()
    bench.full_vs_nbdcopy("full_plain_fragmented", dom, *extra)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=parse_size, default=4 * GiB)
    p.add_argument("--data", type=parse_size, default=1536 * MiB)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-big", action="store_true")
    p.add_argument("--only", choices=("random", "text", "inc", "frag"), action="append")
    p.add_argument("--extra", default="", help="extra virtnbdbackup options, space separated")
    args = p.parse_args()
    extra = args.extra.split()
    bench = Bench(args)
    work = make_lab_dir(prefix="bench-")
    try:
        only = set(args.only or ("random", "text", "inc"))
        if only & {"random", "inc"}:
            raw = Path(work) / "random.raw"
            make_raw(raw, args.size, args.data, "random", seed=1)
            dom = bench.domain([DiskSpec("sda", "sata", "qcow2", args.size)], {"sda": raw})
            raw.unlink()
            if "random" in only:
                bench.full_vs_nbdcopy("full_plain_random", dom, *extra)
                bench.full_vs_nbdcopy("full_lz4_random", dom, "-z", *extra)
            if "inc" in only:
                bench.inc_scattered(dom)
        if "text" in only:
            raw = Path(work) / "text.raw"
            make_raw(raw, args.size, args.data, "text", seed=2)
            dom = bench.domain([DiskSpec("sda", "sata", "qcow2", args.size)], {"sda": raw})
            raw.unlink()
            bench.full_vs_nbdcopy("full_lz4_text", dom, "-z", *extra)
        if "frag" in (args.only or ()):
            fragmented(bench, work, extra)
        if not args.skip_big:
            bench.big_sparse()
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(bench.results, indent=1))
    return 0 if rss_verdict(bench.results) else 1


if __name__ == "__main__":
    sys.exit(main())
