"""Changed-block reads of an inc counted on the other side: the kernel's count of bytes the backup
process received on its NBD sockets (strace), not the tool's own counters."""
from __future__ import annotations

import glob
import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.lab.libvirt_lab import DiskSpec, MiB, random_writes
from tests.system.backup_helpers import backup_cmd, check_point, env, must_read_blocks, ok

pytestmark = pytest.mark.system

SIZE = 32 * MiB
# NBD framing around the data: handshake, reply headers (20 bytes + 8-byte offset per data chunk) and
# block-status replies; measured ~1.4 KiB for this inc
OVERHEAD = 64 * 1024
CONNECT = re.compile(r"^connect\(\d+<UNIX-STREAM:\[(\d+)[^]]*\]>, \{sa_family=AF_UNIX, sun_path=\"([^\"]+)\"")
RECV = re.compile(r"^(?:recvfrom|recvmsg|read)\(\d+<UNIX-STREAM:\[(\d+)->\d+\]>.*\)\s+=\s+(\d+)$")


def _received(trace: Path, socket_name: str) -> tuple[int, int]:
    """(bytes, connections): what the kernel handed the process on sockets it connected to a path ending
    in ``socket_name`` (strace -yy names each socket fd by inode; connect() shows the path), all threads."""
    lines = [line for name in glob.glob(f"{trace}.*") for line in Path(name).read_text(errors="replace").splitlines()]
    inodes = {m.group(1) for line in lines if (m := CONNECT.match(line)) and m.group(2).endswith(socket_name)}
    total = sum(int(m.group(2)) for line in lines if (m := RECV.match(line)) and m.group(1) in inodes)
    return total, len(inodes)


def test_inc_reads_only_changed_blocks_counted_by_the_kernel(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "virtio", "qcow2", SIZE)])
    folder = dom.dir / "backup"
    dom.disk("sda").apply_all(random_writes(seed=31, n=20, size=SIZE))
    ok(dom, "full", folder)
    ops = random_writes(seed=32, n=12, size=SIZE)
    dom.disk("sda").apply_all(ops)
    dom.disk("sda").flush()
    trace = tmp_path / "trace"
    strace = ["strace", "-ff", "-qq", "-yy", "-e", "trace=connect,read,recvfrom,recvmsg", "-o", str(trace)]
    proc = subprocess.run([*strace, *backup_cmd(dom, "inc", folder)], check=False, capture_output=True, text=True,
                          timeout=300, env=env())
    assert proc.returncode == 0, proc.stderr
    received, connections = _received(trace, "backup.sock")
    assert connections >= 1
    must = must_read_blocks(ops)
    assert must > MiB
    # the changed blocks and nothing else crossed the socket (a whole-disk read would be 32 MiB) ...
    assert must <= received <= must + OVERHEAD, (received, must)
    # ... and the tool's own counter agrees with what the kernel delivered
    assert json.loads(proc.stdout)["disks"]["sda"]["bytes_read"] == must
    check_point(dom, folder, "virtnbdbackup.1", {"sda": dom.disk("sda").snapshot("p1")}, tmp_path)
