#!/usr/bin/env python3
"""virtnbdmap benchmark: whole-disk reads of the served export against nbdkit's own file plugin, in one run.

Sets are built like bench_restore.py's (4 GiB virtual, ~1.5 GiB incompressible data in 1 MiB
uncompressed frames). The two sides of a ratio are both served at once and read in turn
(``--repeat`` times each, medians), so load drifts hit both; the CPU time (user+sys) of the server
and of nbdcopy per read, and the load average, are printed with each. Ratios (target in brackets):
  nbdcopy of the virtnbdmap export / nbdcopy of `nbdkit file` serving the restored raw image   [<= 1.5]
  nbdcopy of full + 20 incs / full + 1 inc with the same final content                          [<= 1.2]
  time from `virtnbdmap` start to the first byte served, index of 1M frames                     [<= 2 s]
  peak RSS of nbdkit (which runs the plugin and the reader) for the 1M-frame set               [<= 128 MiB]

Usage: .venv/bin/python bench/bench_map.py [--size GiB] [--data GiB] [--incs N] [--frames N] [--repeat N]
                                         [--map OTHER_TREE/virtnbdmap]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import nbd  # noqa: E402
from bench_restore import GiB, MiB, build, commit  # noqa: E402

from virtnbd.backupset import naming  # noqa: E402
from virtnbd.backupset.manifest import disk_entry  # noqa: E402
from virtnbd.stream.format import StreamMeta  # noqa: E402
from virtnbd.stream.writer import StreamWriter  # noqa: E402

MAP = [sys.executable, os.path.join(ROOT, "virtnbdmap")]


class Server:
    """virtnbdmap (or a plain nbdkit command) on a unix socket, until stopped."""

    def __init__(self, argv: list[str], sock: str, plain: bool = False) -> None:
        self.started = time.perf_counter()
        if plain:
            argv = [*argv[:1], "-f", "-U", sock, *argv[1:]]
        else:
            argv = [*argv, "-s", sock, "--json"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        if plain:
            while not os.path.exists(sock):
                time.sleep(0.005)
        elif self.proc.stdout is not None:
            self.info = json.loads(self.proc.stdout.readline())
        self.uri = f"nbd+unix:///?socket={sock}"
        self.sock = sock

    def nbdkit_pid(self) -> int:
        return self.info["pid"] if hasattr(self, "info") else self.proc.pid

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        if os.path.exists(self.sock):             # nbdkit itself leaves its socket behind
            os.unlink(self.sock)


@dataclass(frozen=True)
class Run:
    """Median wall seconds of the copies, and CPU seconds (user+sys) per copy of the server and of nbdcopy."""

    wall: float
    server_cpu: float
    client_cpu: float

    @property
    def cpu(self) -> float:
        return self.server_cpu + self.client_cpu

    def show(self) -> str:
        return f"{self.wall:.2f} s (cpu: server {self.server_cpu:.2f} s + nbdcopy {self.client_cpu:.2f} s)"


def proc_cpu(pid: int) -> float:
    """CPU seconds (user+sys) a process used so far, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def copy(uri: str) -> tuple[float, float]:
    """Wall and CPU seconds (user+sys) of one ``nbdcopy URI null:``."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["nbdcopy", uri, "null:"])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"nbdcopy {uri} failed ({proc.returncode})")
    return time.perf_counter() - t0, usage.ru_utime + usage.ru_stime


def compare(a: Server, b: Server, repeat: int) -> tuple[Run, Run, float]:
    """Both servers read whole ``repeat`` times, the two interleaved (load drifts over a run;
    so both sides see the same), after one warming read each; and the load average before."""
    servers = (a, b)
    for server in servers:
        copy(server.uri)                        # warm the page cache for both sides alike
    load = os.getloadavg()[0]
    walls: list[list[float]] = [[], []]
    client = [0.0, 0.0]
    cpu0 = [proc_cpu(s.nbdkit_pid()) for s in servers]
    for r in range(repeat):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            wall, cpu = copy(servers[i].uri)
            walls[i].append(wall)
            client[i] += cpu
    runs = [Run(statistics.median(walls[i]), (proc_cpu(servers[i].nbdkit_pid()) - cpu0[i]) / repeat,
                client[i] / repeat) for i in (0, 1)]
    return runs[0], runs[1], load


def ratio(name: str, ours: Run, ref: Run, load: float, target: float) -> str:
    return (f"{name}: {ours.show()} / {ref.show()} = {ours.wall / ref.wall:.2f}   [<= {target}]\n"
            f"    cpu ratio {ours.cpu / ref.cpu:.2f}, load average {load:.1f}")


def served(argv_a: list[str], argv_b: list[str], base: str, repeat: int,
           plain_b: bool = False) -> tuple[Run, Run, float]:
    a = Server(argv_a, os.path.join(base, "a.sock"))
    try:
        b = Server(argv_b, os.path.join(base, "b.sock"), plain_b)
        try:
            return compare(a, b, repeat)
        finally:
            b.stop()
    finally:
        a.stop()


def many_frames(folder: str, frames: int) -> None:
    """One full point whose index lists ``frames`` frames (4 KiB each, one in 64 holds data)."""
    os.makedirs(folder)
    size = frames * 4096
    file = naming.data_file("sda", "full", "virtnbdbackup.0")
    meta = StreamMeta(virtual_size=size, disk="sda", disk_format="qcow2", level="full", checkpoint="virtnbdbackup.0",
                      parent=None, time="2026-11-22T00:00:00+00:00", compression=None, tool_version="bench")
    path = os.path.join(folder, file)
    block = os.urandom(4096)
    with open(path, "wb") as f:
        w = StreamWriter(f, meta, path)
        for i in range(frames):
            if i % 64 == 0:
                w.write_data(i * 4096, block)
            else:
                w.write_zero(i * 4096, 4096)
        totals = w.finish()
    commit(folder, "full", "virtnbdbackup.0", None, disk_entry(meta, file, totals))


def first_byte(folder: str, sock: str) -> tuple[float, int]:
    """Seconds from virtnbdmap's start to the first byte read, and nbdkit's peak RSS (KiB)."""
    server = Server([*MAP, "-i", folder], sock)
    try:
        h = nbd.NBD()
        h.connect_uri(server.uri)
        h.pread(512, 0)
        ttfb = time.perf_counter() - server.started
        h.shutdown()
        with open(f"/proc/{server.nbdkit_pid()}/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        return ttfb, hwm
    finally:
        server.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=float, default=4.0, help="virtual disk size, GiB")
    ap.add_argument("--data", type=float, default=1.5, help="data, GiB")
    ap.add_argument("--incs", type=int, default=20)
    ap.add_argument("--frames", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--map", default=None, help="virtnbdmap to measure (default: this tree's; another tree's "
                                                "for a before/after comparison in the same conditions)")
    args = ap.parse_args()
    if args.map:
        MAP[1:] = [os.path.abspath(args.map)]
    base = tempfile.mkdtemp(prefix="bench-map-", dir=args.dir)
    try:
        paths = build(base, size=int(args.size * GiB), data=int(args.data * GiB), incs=args.incs, change=64 * MiB)
        ours, ref, load = served([*MAP, "-i", paths["main"]], ["nbdkit", "-r", "file", paths["ref"]], base,
                                 args.repeat, plain_b=True)
        print(ratio("map read / nbdkit file", ours, ref, load, 1.5))
        long_, short, load = served([*MAP, "-i", paths["long"]], [*MAP, "-i", paths["short"]], base, args.repeat)
        print(ratio(f"full+{args.incs} inc / full+1 inc", long_, short, load, 1.2))
        for key in ("main", "long", "short", "ref"):
            shutil.rmtree(paths[key]) if os.path.isdir(paths[key]) else os.unlink(paths[key])
        folder = os.path.join(base, "frames")
        many_frames(folder, args.frames)
        ttfb, hwm = first_byte(folder, os.path.join(base, "s.sock"))
        print(f"{args.frames} frames: first byte after {ttfb:.2f} s   [<= 2 s], nbdkit peak RSS "
              f"{hwm / 1024:.0f} MiB   [<= 128 MiB]")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
