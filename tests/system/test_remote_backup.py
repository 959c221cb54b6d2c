"""Backups of "another host" (issue 15): real libvirtd + QEMU reached over qemu+ssh, NBD over TLS.

The remote is this host through the remote lab (tests/lab/remote_lab.py): its own sshd with a pinned
host key, backup TLS configured in qemu.conf. Every point is restored locally from the set and compared
by bytes; after every run (good, failed, SIGKILLed) the "remote" holds no job, no qemu-nbd and no
work folder of ours.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.lab.libvirt_lab import DiskSpec, LabDomain, MiB, pids_of
from tests.lab.remote_lab import RemoteLab
from tests.system.backup_helpers import BACKUP, job_running
from tests.system.chain_helpers import check_restored, snap_all, write_all

pytestmark = pytest.mark.system

SAFE = ("data", "data", "pattern", "zero")
SIZE = 8 * MiB


def _cmd(lab: RemoteLab, dom: LabDomain, level: str, folder: Path, *extra: str,
         tls: Path | None = None, known_hosts: Path | None = None) -> list[str]:
    return [sys.executable, BACKUP, "-U", lab.uri(), "-d", dom.name, "-l", level, "-o", str(folder), "-n", "--json",
            "--scratchdir", str(dom.dir), "--tls-cert", str(tls or lab.client_tls),
            "--ssh-known-hosts", str(known_hosts or lab.known_hosts), *extra]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def _ok(lab: RemoteLab, dom: LabDomain, level: str, folder: Path, *extra: str) -> dict[str, Any]:
    proc = _run(_cmd(lab, dom, level, folder, *extra))
    assert proc.returncode == 0, proc.stderr
    summary: dict[str, Any] = json.loads(proc.stdout)
    _nothing_left(dom)
    return summary


def _qemu_nbd_of(dom: LabDomain) -> list[int]:
    found = []
    for pid in pids_of("qemu-nbd"):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(dom.dir).encode() in cmdline:
            found.append(pid)
    return found


def _nothing_left(dom: LabDomain, wait: float = 10.0) -> None:
    """No job, no qemu-nbd of this domain, no work folder in its scratch dir (the guardian may need a moment)."""
    deadline = time.monotonic() + wait
    while True:
        left = {"job": job_running(dom), "qemu-nbd": _qemu_nbd_of(dom),
                "work": sorted(p.name for p in dom.dir.glob("virtnbd.*"))}
        if not any(left.values()):
            return
        assert time.monotonic() < deadline, f"left behind on the remote: {left}"
        time.sleep(0.2)


def test_chain_over_ssh_online_offline_online(remote_lab: RemoteLab, make_domain, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    folder = tmp_path / "backup"
    expected: dict[str, dict[str, Path]] = {}

    write_all(dom, 1, 4, SAFE)
    full = _ok(remote_lab, dom, "full", folder)
    assert full["remote"]["tls"] and full["remote"]["nbd"][0].startswith("nbds://localhost:")
    expected[full["point"]] = snap_all(dom, "p0")
    write_all(dom, 2, 4, SAFE)
    inc = _ok(remote_lab, dom, "inc", folder)
    expected[inc["point"]] = snap_all(dom, "p1")

    dom.stop()
    write_all(dom, 3, 4, SAFE)
    off = _ok(remote_lab, dom, "inc", folder)
    assert off["consistency"] == "offline" and off["remote"]["nbd"][0].startswith("nbds://")
    expected[off["point"]] = snap_all(dom, "p2")

    dom.start()
    write_all(dom, 4, 4, SAFE)
    last = _ok(remote_lab, dom, "inc", folder)
    expected[last["point"]] = snap_all(dom, "p3")

    assert last["points"] == ["virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2", "virtnbdbackup.3"]
    for point, images in expected.items():
        check_restored(folder, point, images, tmp_path)
