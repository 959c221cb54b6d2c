"""Large synthetic chains for the scale test and bench: many small frames, many points, many disks.

Streams are written with the project's StreamWriter and committed with
``backupset.manifest.commit_point`` (the restore reads them through the same
code path as real backups). Every point writes ``changes`` blocks of ``block``
bytes at random block offsets; the expected disk content of the newest point is
kept in a sparse raw file (``expected``) so a restore can be compared with
``qemu-img compare`` or sampled. Block contents are cheap to make and unique
per (point, block): 16 bytes repeated.
"""
from __future__ import annotations

import os
import random
import resource
import struct
import subprocess
import sys
import time
from dataclasses import dataclass

from virtnbd.backupset import manifest, naming
from virtnbd.stream.format import StreamMeta
from virtnbd.stream.writer import StreamWriter

UUID = "7d1c3f0a-0000-4000-8000-0000000019{:02d}"


@dataclass(frozen=True)
class ScaleSet:
    folder: str
    disks: tuple[str, ...]
    expected: dict[str, str]        # disk -> raw file with the newest point's content
    frames: int                     # data frames written over all points and disks
    size: int


def block_bytes(point: int, index: int, block: int) -> bytes:
    return struct.pack("<QQ", point + 1, index) * (block // 16)


def write_stream(folder: str, disk: str, level: str, point: str, parent: str | None, size: int,  # noqa: PLR0917
                 blocks: list[tuple[int, bytes]], disk_format: str = "raw") -> manifest.DiskEntry:
    """One stream file of ``blocks`` (disk offset, bytes) in offset order; its manifest entry."""
    file = naming.data_file(disk, level, point)
    meta = StreamMeta(virtual_size=size, disk=disk, disk_format=disk_format, level=level, checkpoint=point,
                      parent=parent, time="2026-12-05T00:00:00+00:00", compression=None, tool_version="scale")
    path = os.path.join(folder, file)
    with open(path, "wb") as f:
        w = StreamWriter(f, meta, path)
        for offset, data in blocks:
            w.write_data(offset, data)
        totals = w.finish()
    return manifest.disk_entry(meta, file, totals)


def build(folder: str, *, size: int, points: int, changes: int, block: int = 4096, disks: int = 1,
          seed: int = 19, name: str = "vnbd-scale") -> ScaleSet:
    """A chain of ``points`` points (a full then incs) of ``disks`` disks, ``changes`` blocks each."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    names = tuple(f"vd{chr(ord('a') + i)}" if i < 26 else f"vd{i}" for i in range(disks))
    expected = {d: os.path.join(folder, f"expected.{d}.raw") for d in names}
    fds = {d: os.open(expected[d], os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600) for d in names}
    nblocks = size // block
    frames, parent = 0, None
    try:
        for d in names:
            os.ftruncate(fds[d], size)
        for p in range(points):
            point = naming.checkpoint_name(p)
            level = "full" if p == 0 else "inc"
            entries = {}
            for d in names:
                chosen = sorted(rng.sample(range(nblocks), min(changes, nblocks)))
                blocks = [(i * block, block_bytes(p, i, block)) for i in chosen]
                for offset, data in blocks:
                    os.pwrite(fds[d], data, offset)
                entries[d] = write_stream(folder, d, level, point, parent, size, blocks)
                frames += len(blocks)
            manifest.commit_point(folder, manifest.Point(name=point, level=level, parent=parent, checkpoint=point,
                                                         time="2026-12-05T00:00:00+00:00", disks=entries,
                                                         domain_xml=None, consistency="crash"),
                                  name, UUID.format(seed % 100))
            parent = point
    finally:
        for fd in fds.values():
            os.close(fd)
    return ScaleSet(folder, names, expected, frames, size)


def single_point_copy(src: ScaleSet, folder: str, block: int = 4096, name: str = "vnbd-scale1") -> ScaleSet:
    """One full point holding the same final content as ``src`` (its expected files, block by block)."""
    os.makedirs(folder, exist_ok=True)
    entries, frames = {}, 0
    for d in src.disks:
        blocks = list(_allocated_blocks(src.expected[d], src.size, block))
        entries[d] = write_stream(folder, d, "full", naming.checkpoint_name(0), None, src.size, blocks)
        frames += len(blocks)
    point = naming.checkpoint_name(0)
    manifest.commit_point(folder, manifest.Point(name=point, level="full", parent=None, checkpoint=point,
                                                 time="2026-12-05T00:00:00+00:00", disks=entries,
                                                 domain_xml=None, consistency="crash"),
                          name, UUID.format(99))
    return ScaleSet(folder, src.disks, src.expected, frames, src.size)


def _allocated_blocks(path: str, size: int, block: int):  # type: ignore[no-untyped-def]
    with open(path, "rb") as f:
        fd = f.fileno()
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                return
            end = os.lseek(fd, start, os.SEEK_HOLE)
            for off in range(start - start % block, end, block):
                data = os.pread(fd, block, off)
                if data.count(0) != len(data):
                    yield off, data
            pos = end


def sample_ok(image: str, expected: str, size: int, samples: int = 256, seed: int = 5) -> bool:
    """``samples`` random 4 KiB ranges of a raw ``image`` equal the expected file."""
    rng = random.Random(seed)
    with open(image, "rb") as a, open(expected, "rb") as b:
        for _ in range(samples):
            off = rng.randrange(0, max(1, size - 4096))
            if os.pread(a.fileno(), 4096, off) != os.pread(b.fileno(), 4096, off):
                return False
    return True


CHILD = """import importlib, sys
from virtnbd.restore import plan
if sys.argv[1] != "-":
    plan.ENTRY_BUDGET = int(sys.argv[1])
main = importlib.import_module(sys.argv.pop(2)).main
try:
    rc = main(sys.argv[2:])
finally:
    with open("/proc/self/status") as f:
        peak = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    sys.stderr.write(f"\\nVMHWM {peak}\\n")
sys.exit(rc)
"""


@dataclass(frozen=True)
class RestoreRun:
    returncode: int
    seconds: float
    peak_kib: int          # VmHWM of the restore process itself (after exec, so not the parent's memory)
    stderr: str
    cpu: float = 0.0       # user+sys seconds of the child


def run_restore(args: list[str], budget: int | None = None, cwd: str | None = None) -> RestoreRun:
    """virtnbdrestore ``args`` in a child process (planner entry budget ``budget`` when given)."""
    return run_cli("virtnbd.cli.restore", [*args, "--noprogress"], budget, cwd)


def run_cli(module: str, args: list[str], budget: int | None = None, cwd: str | None = None) -> RestoreRun:
    """``module``.main(args) in a child process that reports its own peak RSS."""
    started, cpu0 = time.monotonic(), _children_cpu()
    res = subprocess.run([sys.executable, "-c", CHILD, "-" if budget is None else str(budget), module, *args],
                         cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, check=False)
    seconds = time.monotonic() - started
    lines = res.stderr.rstrip().splitlines()
    peak = int(lines[-1].split()[1]) if lines and lines[-1].startswith("VMHWM ") else 0
    return RestoreRun(res.returncode, seconds, peak, "\n".join(lines[:-1] if peak else lines),
                      _children_cpu() - cpu0)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
