#!/usr/bin/env python3
"""virtnbdmap benchmark: whole-disk reads of the served export against nbdkit's own file plugin, in one run.

Sets are built like bench_restore.py's (4 GiB virtual, ~1.5 GiB incompressible data in 1 MiB
uncompressed frames). Ratios printed (target in brackets):
  nbdcopy of the virtnbdmap export / nbdcopy of `nbdkit file` serving the restored raw image   [<= 1.5]
  nbdcopy of full + 20 incs / full + 1 inc with the same final content                          [<= 1.2]
  time from `virtnbdmap` start to the first byte served, index of 1M frames                     [<= 2 s]
  peak RSS of nbdkit (which runs the plugin and the reader) for the 1M-frame set               [<= 128 MiB]

Usage: .venv/bin/python bench/bench_map.py [--size GiB] [--data GiB] [--incs N] [--frames N] [--repeat N]
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
        else:
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


def copy_time(uri: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["nbdcopy", uri, "null:"], check=True)
    return time.perf_counter() - t0


def best(server: Server, repeat: int) -> float:
    copy_time(server.uri)                       # warm the page cache for both sides alike
    return statistics.median(copy_time(server.uri) for _ in range(repeat))


def served(argv: list[str], sock: str, repeat: int, plain: bool = False) -> float:
    server = Server(argv, sock, plain)
    try:
        return best(server, repeat)
    finally:
        server.stop()


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
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="bench-map-", dir=args.dir)
    try:
        paths = build(base, size=int(args.size * GiB), data=int(args.data * GiB), incs=args.incs, change=64 * MiB)
        sock = os.path.join(base, "s.sock")
        ours = served([*MAP, "-i", paths["main"]], sock, args.repeat)
        ref = served(["nbdkit", "-r", "file", paths["ref"]], sock, args.repeat, plain=True)
        long_ = served([*MAP, "-i", paths["long"]], sock, args.repeat)
        short = served([*MAP, "-i", paths["short"]], sock, args.repeat)
        print(f"map read {ours:.2f} s / nbdkit file {ref:.2f} s = {ours / ref:.2f}   [<= 1.5]")
        print(f"full+{args.incs} inc {long_:.2f} s / full+1 inc {short:.2f} s = {long_ / short:.2f}   [<= 1.2]")
        for key in ("main", "long", "short", "ref"):
            shutil.rmtree(paths[key]) if os.path.isdir(paths[key]) else os.unlink(paths[key])
        folder = os.path.join(base, "frames")
        many_frames(folder, args.frames)
        ttfb, hwm = first_byte(folder, sock)
        print(f"{args.frames} frames: first byte after {ttfb:.2f} s   [<= 2 s], nbdkit peak RSS "
              f"{hwm / 1024:.0f} MiB   [<= 128 MiB]")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
