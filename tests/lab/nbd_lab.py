"""NBD servers for functional tests of the data path, without libvirt.

Fixtures (imported into tests/conftest.py), each a factory whose servers are
killed at test end:

* ``nbdkit_server(plugin, *args, size=None, expected=None) -> NbdServer``:
  any nbdkit plugin on a unix socket.
* ``nbdkit_memory(size) -> NbdServer``: writable, all zeros.
* ``nbdkit_data(size, ops) -> NbdServer``: read-only, exactly the bytes of
  ``ops`` (data/pattern/zero ops of :mod:`tests.lab.libvirt_lab`) over zeros,
  sparse (zero regions report as holes).
* ``nbdkit_sparse_random(size, seed=1, percent=10, runlength=256 KiB,
  random_content=False) -> NbdServer``: read-only sparse random data;
  expected bytes copied out with nbdcopy.
* ``qemu_nbd_bitmap(size, base_ops, dirty_ops, bitmap="b0") -> NbdServer``:
  a qcow2 written with qemu-io, a dirty bitmap added between ``base_ops`` and
  ``dirty_ops``, exported read-only with ``qemu-nbd --bitmap``; the server
  offers ``qemu:dirty-bitmap:b0``.

Every ``NbdServer`` carries ``expected`` (a raw file with the exact bytes the
export must read as) and ``expected_bytes()``.
"""
from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.lab.common import LabError, MiB, require, run
from tests.lab.diskops import Op, check_qemu_io_output, qemu_io_command, ranges_of


@dataclass
class NbdServer:
    """One running NBD server on a unix socket."""

    sock: Path
    size: int
    expected: Path  # raw file with the bytes the export reads as
    export: str = ""
    bitmap: str | None = None  # dirty bitmap exported (qemu-nbd)
    dirty: list[tuple[int, int]] = field(default_factory=list)  # ranges written after the bitmap
    proc: subprocess.Popen[bytes] | None = None
    argv: list[str] = field(default_factory=list)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.sock}"

    @property
    def dirty_context(self) -> str:
        if not self.bitmap:
            raise LabError("this server exports no dirty bitmap")
        return f"qemu:dirty-bitmap:{self.bitmap}"

    def expected_bytes(self, offset: int = 0, length: int | None = None) -> bytes:
        length = self.size - offset if length is None else length
        with self.expected.open("rb") as f:
            f.seek(offset)
            data = f.read(length)
        return data + bytes(length - len(data))

    def connect(self, contexts: Sequence[str] = ()) -> Any:
        """A connected ``nbd.NBD`` handle (call ``.shutdown()`` when done)."""
        return nbd_connect(self.sock, self.export, contexts)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


def _wait_socket(proc: subprocess.Popen[bytes], sock: Path, argv: Sequence[str], wait: float = 15.0) -> None:
    deadline = time.monotonic() + wait
    while not sock.exists():
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise LabError(f"{' '.join(argv)} exited {proc.returncode}: {err.strip()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise LabError(f"{' '.join(argv)}: no socket {sock} after {wait:.0f}s")
        time.sleep(0.02)


def _start(argv: list[str], sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_socket(proc, sock, argv)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    return proc


def write_expected(path: Path, size: int, ops: Sequence[Op]) -> None:
    """A sparse raw file holding ``ops`` applied in order over zeros."""
    with path.open("wb") as f:
        f.truncate(size)
        for op in ops:
            if op.end > size:
                raise ValueError(f"{op} outside {size} bytes")
            f.seek(op.offset)
            f.write(op.data())


def nonzero_segments(data: bytes, block: int = 64 * 1024) -> list[tuple[int, int]]:
    """(offset, length) runs of ``block``-sized pieces that are not all zero."""
    segs: list[list[int]] = []
    zero = bytes(block)
    for off in range(0, len(data), block):
        piece = data[off : off + block]
        if piece == zero[: len(piece)]:
            continue
        if segs and segs[-1][0] + segs[-1][1] == off:
            segs[-1][1] += len(piece)
        else:
            segs.append([off, len(piece)])
    return [(o, n) for o, n in segs]


def apply_qemu_io(image: Path, fmt: str, ops: Sequence[Op], workdir: Path) -> None:
    """Apply ops to an image file with qemu-io (one process for all ops)."""
    if not ops:
        return
    argv = ["qemu-io", "-f", fmt]
    files = []
    for n, op in enumerate(ops):
        data_file = None
        if op.kind == "data":
            data_file = workdir / f"op-{uuid.uuid4().hex[:8]}-{n}.bin"
            data_file.write_bytes(op.data())
            files.append(data_file)
        argv += ["-c", qemu_io_command(op, data_file)]
    try:
        out = run([*argv, str(image)]).stdout
    finally:
        for f in files:
            f.unlink(missing_ok=True)
    for op in ops:
        check_qemu_io_output(op, qemu_io_command(op, Path("-")), out)


class NbdLab:
    """Starts servers in one folder; ``close()`` kills them all."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.servers: list[NbdServer] = []

    def _sock(self) -> Path:
        return self.folder / f"nbd-{uuid.uuid4().hex[:8]}.sock"

    def nbdkit(self, plugin: str, *args: str, size: int | None = None, expected: Path | None = None,
               readonly: bool = False, filters: Sequence[str] = ()) -> NbdServer:
        """``filters``: nbdkit filter names (their parameters go into ``args``)."""
        sock = self._sock()
        argv = ["nbdkit", "--foreground", "--exit-with-parent", "--unix", str(sock)]
        if readonly:
            argv.append("--readonly")
        argv += [*(f"--filter={f}" for f in filters), plugin, *args]
        proc = _start(argv, sock)
        server = NbdServer(sock=sock, size=0, expected=expected or self.folder / "none", proc=proc, argv=argv)
        self.servers.append(server)
        h = server.connect()
        try:
            server.size = int(h.get_size())
        finally:
            h.shutdown()
        if size is not None and server.size != size:
            raise LabError(f"{plugin}: size {server.size} != {size}")
        if expected is None:
            server.expected = self.folder / f"expected-{sock.stem}.raw"
            run(["nbdcopy", "--", server.uri, str(server.expected)], timeout=300)
        return server

    def memory(self, size: int) -> NbdServer:
        expected = self.folder / f"zero-{uuid.uuid4().hex[:8]}.raw"
        with expected.open("wb") as f:
            f.truncate(size)
        return self.nbdkit("memory", f"size={size}", size=size, expected=expected)

    def data(self, size: int, ops: Sequence[Op]) -> NbdServer:
        if any(op.kind == "discard" for op in ops):
            raise ValueError("nbdkit_data serves data/pattern/zero ops only")
        tag = uuid.uuid4().hex[:8]
        expected = self.folder / f"data-{tag}.raw"
        write_expected(expected, size, ops)
        content = expected.read_bytes()
        expr = []
        for n, (off, length) in enumerate(nonzero_segments(content)):
            seg = self.folder / f"data-{tag}-seg{n}.bin"
            seg.write_bytes(content[off : off + length])
            expr.append(f"@{off} <{seg}")
        return self.nbdkit("data", " ".join(expr) or "0", f"size={size}", size=size, expected=expected,
                           readonly=True)

    def sparse_random(self, size: int, seed: int = 1, percent: float = 10, runlength: int = 256 * 1024,
                      random_content: bool = False, *, log: Path | None = None) -> NbdServer:
        """``log``: serve through nbdkit's log filter into that file, advertising multi-conn
        (multi-conn filter), so tests count on the server side what was read and over which
        connections (:class:`ServerLog`)."""
        args = [f"size={size}", f"seed={seed}", f"percent={percent}", f"runlength={runlength}"]
        if random_content:
            args.append("random-content=true")
        filters: tuple[str, ...] = ()
        if log is not None:
            filters = ("multi-conn", "log")
            args += ["multi-conn-mode=unsafe", f"logfile={log}"]
        return self.nbdkit("sparse-random", *args, size=size, readonly=True, filters=filters)

    def qemu_nbd_bitmap(self, size: int, base_ops: Sequence[Op], dirty_ops: Sequence[Op],
                        bitmap: str = "b0") -> NbdServer:
        tag = uuid.uuid4().hex[:8]
        image = self.folder / f"bitmap-{tag}.qcow2"
        expected = self.folder / f"bitmap-{tag}.raw"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)])
        with expected.open("wb") as f:
            f.truncate(size)
        apply_qemu_io(image, "qcow2", base_ops, self.folder)
        run(["qemu-img", "bitmap", "--add", str(image), bitmap])
        apply_qemu_io(image, "qcow2", dirty_ops, self.folder)
        apply_qemu_io(expected, "raw", [*base_ops, *dirty_ops], self.folder)
        sock = self._sock()
        argv = ["qemu-nbd", "--read-only", "--persistent", "--shared=8", "-f", "qcow2", f"--bitmap={bitmap}",
                "-k", str(sock), str(image)]
        proc = _start(argv, sock)
        server = NbdServer(sock=sock, size=size, expected=expected, bitmap=bitmap, dirty=ranges_of(dirty_ops),
                           proc=proc, argv=argv)
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        self.servers.clear()


def nbd_connect(sock: Path | str, export: str = "", contexts: Sequence[str] = ()) -> Any:
    """A libnbd handle connected to ``export`` on a unix socket, with meta contexts requested."""
    import nbd

    h = nbd.NBD()
    for ctx in contexts:
        h.add_meta_context(ctx)
    h.set_export_name(export)
    h.connect_unix(str(sock))
    return h


def read_all(h: Any, size: int, chunk: int = 4 * MiB) -> bytes:
    """Every byte of an export through a libnbd handle."""
    return b"".join(h.pread(min(chunk, size - off), off) for off in range(0, size, chunk))


def extents(h: Any, size: int, context: str) -> list[tuple[int, int, int]]:
    """All (offset, length, flags) extents of ``context`` over the export."""
    found: list[tuple[int, int, int]] = []
    end = [0]

    def cb(metacontext: str, offset: int, entries: list[int], err: object) -> int:
        if metacontext != context:
            return 0
        pos = offset
        for i in range(0, len(entries), 2):
            found.append((pos, entries[i], entries[i + 1]))
            pos += entries[i]
        end[0] = pos
        return 0

    off = 0
    while off < size:
        end[0] = off
        h.block_status(min(size - off, 1 << 30), off, cb)
        if end[0] <= off:
            raise LabError(f"block_status for {context} made no progress at {off}")
        off = min(end[0], size)
    return found


def flagged_ranges(h: Any, size: int, context: str, flag: int) -> list[tuple[int, int]]:
    """Merged (offset, length) ranges whose extent flags contain ``flag``.

    For ``qemu:dirty-bitmap:*`` flag 1 means dirty; for ``base:allocation``
    flag 1 is a hole and 2 reads as zero.
    """
    merged: list[list[int]] = []
    for off, length, flags in extents(h, size, context):
        if not flags & flag:
            continue
        if merged and merged[-1][0] + merged[-1][1] == off:
            merged[-1][1] += length
        else:
            merged.append([off, length])
    return [(o, n) for o, n in merged]


def _lab_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # short path: unix socket paths are limited to 107 bytes
    return Path(tmp_path_factory.mktemp("nbd", numbered=True))


@pytest.fixture
def nbd_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NbdLab]:
    """The :class:`NbdLab` behind the factories (one per test)."""
    require("NBD lab", ("nbdkit", "qemu-nbd", "qemu-img", "qemu-io", "nbdcopy"), ("nbd",))
    lab = NbdLab(_lab_folder(tmp_path_factory))
    try:
        yield lab
    finally:
        lab.close()
        with contextlib.suppress(OSError):
            shutil.rmtree(lab.folder)


@pytest.fixture
def nbdkit_server(nbd_lab: NbdLab) -> Callable[..., NbdServer]:
    return nbd_lab.nbdkit


@pytest.fixture
def nbdkit_memory(nbd_lab: NbdLab) -> Callable[[int], NbdServer]:
    return nbd_lab.memory


@pytest.fixture
def nbdkit_data(nbd_lab: NbdLab) -> Callable[[int, Sequence[Op]], NbdServer]:
    return nbd_lab.data


@pytest.fixture
def nbdkit_sparse_random(nbd_lab: NbdLab) -> Callable[..., NbdServer]:
    return nbd_lab.sparse_random


@pytest.fixture
def qemu_nbd_bitmap(nbd_lab: NbdLab) -> Callable[..., NbdServer]:
    return nbd_lab.qemu_nbd_bitmap


@dataclass(frozen=True)
class ServerLog:
    """What an nbdkit log filter saw after ``start`` (a byte offset into the log file): the
    server's side of a read, independent of the client's own counters."""

    reads: tuple[tuple[int, int, int], ...]  # (connection, offset, count)
    connections: frozenset[int]              # connections that connected after start

    @classmethod
    def read(cls, log: Path, start: int = 0) -> ServerLog:
        with log.open("rb") as f:
            f.seek(start)
            text = f.read().decode()
        reads, conns = [], set()
        for line in text.splitlines():
            m = re.search(r"connection=(\d+) (Read|Connect) ", line)
            if not m:
                continue
            conn = int(m.group(1))
            if m.group(2) == "Connect":
                conns.add(conn)
                continue
            fields = dict(re.findall(r"(\w+)=(0x[0-9a-f]+)", line))
            reads.append((conn, int(fields["offset"], 16), int(fields["count"], 16)))
        return cls(tuple(reads), frozenset(conns))

    @property
    def bytes_served(self) -> int:
        return sum(count for _c, _o, count in self.reads)

    @property
    def reading_connections(self) -> frozenset[int]:
        return frozenset(c for c, _o, _n in self.reads)


def nbdkit_command(plugin: str, *args: str) -> list[str]:
    """argv for ``nbd.NBD().connect_command`` (a private server over stdin/stdout)."""
    return ["nbdkit", "--single", "--exit-with-parent", plugin, *args]
