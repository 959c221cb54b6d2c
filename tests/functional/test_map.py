"""virtnbdmap serves a disk at every point of a set through nbdkit: nbdcopy of the export equals the disk
at that point, random reads crossing frame and point boundaries equal it, a damaged frame fails its reads
only, and SIGTERM/--timeout stop the server and remove its socket."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import nbd
import pytest

from tests.functional.restore_sets import SetBuilder, compare
from tests.functional.test_pointreader import build_chain, damage_first_data_frame, random_ranges
from tests.functional.test_restore_legacy import _build as build_legacy
from virtnbd.access.options import MapOptions
from virtnbd.access.serve import nbdkit_argv
from virtnbd.cli.map import parse
from virtnbd.errors import UsageError

ROOT = Path(__file__).resolve().parents[2]
UPSTREAM = ROOT / "tests" / "data" / "upstream-sets"


class Mapped:
    def __init__(self, folder: Path | str, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "virtnbdmap"), "-i", str(folder), "--json", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"virtnbdmap did not serve: {self.proc.stderr.read()}")
        self.info = json.loads(line)
        self.uri = self.info["uri"]

    def __enter__(self) -> Mapped:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=20)
        if not hasattr(self, "stderr"):
            self.stderr = self.proc.stderr.read()
        return code

    def handle(self) -> nbd.NBD:
        h = nbd.NBD()
        h.connect_uri(self.uri)
        return h


def copy_and_compare(mapped: Mapped, want: Path, tmp: Path) -> None:
    out = tmp / "copy.raw"
    subprocess.run(["nbdcopy", mapped.uri, str(out)], check=True)
    compare(str(out), "raw", str(want))
    out.unlink()


def random_reads(mapped: Mapped, want: bytes, seed: int) -> None:
    h = mapped.handle()
    try:
        assert h.get_size() == len(want)
        for start, length in random_ranges(len(want), seed):
            assert h.pread(length, start) == want[start:start + length], (start, length)
    finally:
        h.shutdown()


def test_every_point_of_an_lz4_chain_and_a_plain_set(tmp_path):
    for compression in ("lz4", None):
        b = build_chain(tmp_path / f"set-{compression}", compression)
        for n, point in enumerate(b.points):
            with Mapped(b.folder, "--until", point) as mapped:
                copy_and_compare(mapped, Path(b.shadow_path(point)), tmp_path)
                random_reads(mapped, Path(b.shadow_path(point)).read_bytes(), n)


def test_virtnbdbackup_sets_written_by_the_tool_itself(tmp_path):
    for kind in ("plain", "lz4"):
        want = dict(line.split() for line in (UPSTREAM / f"{kind}.expected").read_text().splitlines())
        for n in range(3):
            with Mapped(UPSTREAM / kind, "--until", f"virtnbdbackup.{n}") as mapped:
                out = tmp_path / "copy.raw"
                subprocess.run(["nbdcopy", mapped.uri, str(out)], check=True)
                assert hashlib.sha256(out.read_bytes()).hexdigest() == want[f"p{n}"], (kind, n)
                random_reads(mapped, out.read_bytes(), n)


def test_synthetic_virtnbdbackup_set_with_two_disks(tmp_path):
    folder = tmp_path / "legacy"
    expected, names = build_legacy(folder, True)
    for n, point in enumerate(names):
        with Mapped(folder, "--until", point, "-d", "sdb") as mapped:
            random_reads(mapped, expected[point]["sdb"], n)


def test_extents_keep_copies_thin(tmp_path):
    b = SetBuilder(str(tmp_path / "set"), size=16 << 20, cluster=64 << 10, seed=2)
    b.scribble(3, zero_share=0)
    b.full()
    with Mapped(b.folder) as mapped:
        out = tmp_path / "thin.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", mapped.uri, str(out)], check=True)
        info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(out)], check=True,
                                         capture_output=True, text=True).stdout)
        assert info["actual-size"] < 2 << 20
        compare(str(out), "qcow2", b.shadow_path(b.points[-1]))


def test_a_flipped_byte_fails_reads_of_that_frame_only(tmp_path):
    b = build_chain(tmp_path / "set", "lz4", incs=1)
    stream = Path(b.folder) / "sda.full.data"
    ref = damage_first_data_frame(stream, 50, 0x01)
    want = Path(b.shadow_path(b.points[0])).read_bytes()
    with Mapped(b.folder, "--until", b.points[0]) as mapped:
        h = mapped.handle()
        with pytest.raises(nbd.Error):
            h.pread(4096, ref.offset + 100)
        rng = random.Random(1)
        for _ in range(20):
            start = rng.randrange(len(want) - 4096)
            if start + 4096 > ref.offset and start < ref.offset + ref.length:
                continue
            assert h.pread(4096, start) == want[start:start + 4096]
        h.shutdown()
        mapped.stop()
    assert "checksum mismatch" in mapped.stderr or "corrupt" in mapped.stderr
    assert "sda.full.data" in mapped.stderr


def test_sigterm_and_timeout_stop_and_remove_the_socket(tmp_path):
    b = SetBuilder(str(tmp_path / "set"), size=1 << 20, seed=4)
    b.scribble(2)
    b.full()
    sock = tmp_path / "s.sock"
    mapped = Mapped(b.folder, "-s", str(sock))
    assert sock.exists() and (sock.stat().st_mode & 0o777) == 0o660
    assert mapped.stop() == 128 + signal.SIGTERM
    assert not sock.exists()
    timed = Mapped(b.folder, "-s", str(sock), "--timeout", "1")
    assert timed.proc.wait(timeout=20) == 0
    assert not sock.exists()


def test_writable_keeps_the_set_unchanged(tmp_path):
    b = SetBuilder(str(tmp_path / "set"), size=1 << 20, seed=4)
    b.scribble(4)
    b.full()
    before = {p.name: p.read_bytes() for p in Path(b.folder).iterdir()}
    with Mapped(b.folder, "--writable") as mapped:
        h = mapped.handle()
        assert not h.is_read_only()
        h.pwrite(b"x" * 4096, 8192)
        assert h.pread(4096, 8192) == b"x" * 4096
        h.shutdown()
    assert {p.name: p.read_bytes() for p in Path(b.folder).iterdir()} == before


def test_bad_input_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "virtnbdmap"), "-i", str(tmp_path / "nope")],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "no such backup folder" in res.stderr
    with pytest.raises(UsageError, match="TLS"):
        parse(["-i", "x", "--listen", "127.0.0.1:10999"])


def test_tcp_needs_tls_unless_insecure():
    tls = nbdkit_argv(MapOptions(input="x", listen=("127.0.0.1", 10999), tls_certificates="/pki"), None, "p")
    assert "--tls=require" in tls and "--tls-certificates=/pki" in tls and "-r" in tls
    plain = nbdkit_argv(MapOptions(input="x", listen=("127.0.0.1", 10999), insecure=True), None, "p")
    assert not any(a.startswith("--tls") for a in plain)
    assert "--filter=cow" in nbdkit_argv(MapOptions(input="x", writable=True), "/s", "p")
    assert os.path.isfile(tls[tls.index("python") + 1])
