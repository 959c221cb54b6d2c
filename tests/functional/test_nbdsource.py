"""NbdSource against real nbdkit / qemu-nbd servers."""
from __future__ import annotations

import pytest

from tests.lab.libvirt_lab import MiB, data_op, pattern_op, zero_op
from tests.lab.nbd_lab import ServerLog
from virtnbd import errors
from virtnbd.source.extents import BASE_ALLOCATION, DATA, iter_extents, split
from virtnbd.source.nbdsource import NbdSource

pytest.importorskip("nbd")


def test_reads_match_expected_over_several_connections(nbd_lab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The server advertises multi-conn; its log (not our counters) shows the reads spread over
    three connections and exactly the data extents' bytes served."""
    log = tmp_path / "nbdkit.log"
    server = nbd_lab.sparse_random(64 * MiB, seed=5, percent=30, random_content=True, log=log)
    expected = server.expected.read_bytes()
    start = log.stat().st_size     # the lab's own size probe and nbdcopy of the expected image
    with NbdSource(str(server.sock), server.export, connections=3, depth=4) as src:
        assert src.size == 64 * MiB
        assert src.multi_conn
        assert len(src._workers) == 3
        extents = list(split(iter_extents(src.block_status, src.size), 1 * MiB))
        data_extents = [e for e in extents if e.kind == DATA]
        total = 0
        for n in range(0, len(data_extents), 8):      # the pool holds 32 buffers: release as we go
            batch = [(e, src.read(e.offset, e.length)) for e in data_extents[n:n + 8]]
            for ext, fut in batch:
                chunk = fut.result()
                assert bytes(chunk.data) == expected[ext.offset:ext.end]
                chunk.release()
                total += ext.length
        futures = data_extents
        assert src.counters.bytes_read == total > 0
        assert src.counters.requests == len(futures)
        # what is not listed as data reads as zeros
        data = sum(e.length for e in extents if e.kind == DATA)
        assert expected.count(0) >= len(expected) - data
    seen = ServerLog.read(log, start)
    # the first connection asks for the size and the extents; three more read the data
    assert len(seen.connections) == 4, seen.connections
    assert len(seen.reading_connections) == 3, seen.reads
    assert seen.bytes_served == total == data
    assert _merged((o, n) for _c, o, n in seen.reads) == _merged((e.offset, e.length) for e in data_extents)


def _merged(ranges) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    """(offset, end) intervals of the union; overlapping input would make the byte sums above differ."""
    out: list[tuple[int, int]] = []
    for off, length in sorted(ranges):
        if out and out[-1][1] == off:
            out[-1] = (out[-1][0], off + length)
        else:
            out.append((off, off + length))
    return out


def test_a_chunk_read_in_several_requests_is_exact(nbd_lab) -> None:  # type: ignore[no-untyped-def]
    server = nbd_lab.sparse_random(16 * MiB, seed=9, percent=60, random_content=True)
    expected = server.expected.read_bytes()
    with NbdSource(str(server.sock), server.export, connections=2, depth=5, buffers=6,
                   buffer_size=256 * 1024, request_size=12 * 1024) as src:   # 22 requests per chunk, uneven tail
        offsets = list(range(0, 16 * MiB, 256 * 1024))
        for n in range(0, len(offsets), 6):
            batch = [(off, src.read(off, 256 * 1024)) for off in offsets[n:n + 6]]
            for off, fut in batch:
                chunk = fut.result()
                assert bytes(chunk.data) == expected[off:off + 256 * 1024], off
                chunk.release()
        assert src.counters.requests == len(offsets)
        assert src.counters.bytes_read == 16 * MiB


def test_a_chunk_failing_in_its_last_request_fails_whole(nbd_lab) -> None:  # type: ignore[no-untyped-def]
    server = nbd_lab.memory(4 * MiB)
    with NbdSource(str(server.sock), server.export, connections=1, buffers=2,
                   buffer_size=64 * 1024, request_size=4096) as src:
        with pytest.raises(errors.NbdError, match=r"offset 4186112"):
            src.pread(4 * MiB - 8192, 16384)      # the first two requests succeed, the third is beyond the end
        assert bytes(src.pread(0, 65536)) == bytes(65536)      # the buffer went back, the source still reads


def test_read_errors_are_precise(nbd_lab) -> None:  # type: ignore[no-untyped-def]
    server = nbd_lab.memory(4 * MiB)
    with NbdSource(str(server.sock), server.export, connections=2) as src:
        with pytest.raises(errors.NbdError, match=r"offset 8388608"):
            src.pread(8 * MiB, 4096)
        # the source is still usable after a failed request
        assert bytes(src.pread(0, 4096)) == bytes(4096)


def test_connect_errors(nbd_lab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(errors.NbdError, match="cannot connect"):
        NbdSource(str(tmp_path / "missing.sock"), "sda").open()
    server = nbd_lab.memory(1 * MiB)
    with pytest.raises(errors.NbdError, match="does not offer metadata context qemu:dirty-bitmap:nope"):
        NbdSource(str(server.sock), server.export, contexts=(BASE_ALLOCATION, "qemu:dirty-bitmap:nope")).open()


def test_dirty_bitmap_extents_cover_exactly_the_writes(nbd_lab) -> None:  # type: ignore[no-untyped-def]
    base = [data_op(0, 2 * MiB, 1)]
    dirty = [data_op(4 * MiB, 128 * 1024, 2), pattern_op(6 * MiB, 64 * 1024, 0x11), zero_op(0, 64 * 1024)]
    server = nbd_lab.qemu_nbd_bitmap(8 * MiB, base, dirty)
    with NbdSource(str(server.sock), server.export, contexts=(BASE_ALLOCATION, server.dirty_context)) as src:
        got = [(e.offset, e.length, e.kind) for e in iter_extents(src.block_status, src.size, server.dirty_context)]
    assert got == [(0, 64 * 1024, "zero"), (4 * MiB, 128 * 1024, "data"), (6 * MiB, 64 * 1024, "data")]


@pytest.mark.parametrize("multi_conn", [True, False])
def test_tcp_readers_connect_with_the_first_and_extras_close(tmp_path, multi_conn: bool) -> None:  # type: ignore[no-untyped-def]
    """Over TCP the reader connections are made together with the first one (quick ACKs, see
    source/tcpwait.py); a server without multi-conn keeps one reader. Bytes and extents exact."""
    import socket
    import struct
    import subprocess
    import time

    from virtnbd.source.nbdsource import TcpAddress

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    size = 4 * MiB
    mode = "plugin" if multi_conn else "disable"          # the pattern plugin itself allows multi-conn
    argv = ["nbdkit", "--foreground", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port),
            "--filter=multi-conn", "pattern", f"size={size}", f"multi-conn-mode={mode}"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
                time.sleep(0.02)
        with NbdSource(TcpAddress("127.0.0.1", port), "", connections=3, depth=4) as src:
            assert (src.size, src.multi_conn, len(src._workers)) == (size, multi_conn, 3 if multi_conn else 1)
            extents = list(iter_extents(src.block_status, src.size))
            assert sum(e.length for e in extents) == size and all(e.kind == DATA for e in extents)
            chunk = src.read(MiB, MiB).result()
            want = b"".join(struct.pack(">Q", off) for off in range(MiB, 2 * MiB, 8))
            assert bytes(chunk.data) == want
            chunk.release()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
