"""Backups of "another host" (issue 15): real libvirtd + QEMU reached over qemu+ssh, NBD over TLS.

The remote is this host through the remote lab (tests/lab/remote_lab.py): its own sshd with a pinned
host key, backup TLS configured in qemu.conf. Every point is restored locally from the set and compared
by bytes; after every run (good, failed, SIGKILLed) the "remote" holds no job, no qemu-nbd and no
work folder of ours.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.lab.libvirt_lab import DiskSpec, LabDomain, MiB, pids_of
from tests.lab.remote_lab import RemoteLab
from tests.system.backup_helpers import BACKUP, job_running
from tests.system.chain_helpers import check_restored, error_line, snap_all, write_all

pytestmark = pytest.mark.system

SAFE = ("data", "data", "pattern", "zero")
SIZE = 8 * MiB


def _cmd(lab: RemoteLab, dom: LabDomain, level: str, folder: Path, *extra: str,
         tls: Path | None = None, known_hosts: Path | None = None, scheme: str = "qemu+ssh") -> list[str]:
    return [sys.executable, BACKUP, "-U", lab.uri(scheme), "-d", dom.name, "-l", level, "-o", str(folder), "-n",
            "--json", "--scratchdir", str(dom.dir), "--tls-cert", str(tls or lab.client_tls),
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
    estimate = _ok(remote_lab, dom, "inc", folder, "-p")      # -p offline: the remote export's bitmap measured
    assert estimate["skipped"] and 0 < estimate["estimate"]["sda"] <= SIZE
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


def _job_port(dom: LabDomain) -> int | None:
    import libvirt

    try:
        xml = dom.dom.backupGetXMLDesc(0)
    except libvirt.libvirtError:
        return None
    found = re.search(r"<server [^>]*port='(\d+)'", xml)
    return int(found.group(1)) if found else None


def _free_base(count: int = 8) -> int:
    """A base port with ``count`` free ports above it on 127.0.0.1."""
    import socket

    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + count > 65000:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as t:
                    t.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise AssertionError("no free port range")


def test_two_domains_at_once_take_different_ports(remote_lab: RemoteLab, make_domain, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import socket

    doms = [make_domain(disks=[DiskSpec("sda", "sata", "qcow2", 48 * MiB)]) for _ in range(2)]
    for i, dom in enumerate(doms):
        dom.disk("sda").write_data(i * MiB, 40 * MiB, seed=10 + i)
    base = _free_base()
    with socket.socket() as busy:                  # the first port is taken: both runs must move on
        busy.bind(("127.0.0.1", base))
        busy.listen()
        procs = [subprocess.Popen(_cmd(remote_lab, dom, "full", tmp_path / dom.name, "--nbd-port", str(base),
                                       scheme=scheme),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for dom, scheme in zip(doms, ("qemu+ssh", "qemu+libssh"), strict=True)]
        overlapped, stopped = False, set()
        try:       # a run whose job listens first is held (SIGSTOP) until the other's job listens too
            while any(p.poll() is None for p in procs) and not overlapped:
                listening = [_job_port(dom) not in (None, base) for dom in doms]
                overlapped = all(listening)
                for i in range(2):
                    if listening[i] and not overlapped and i not in stopped:
                        procs[i].send_signal(signal.SIGSTOP)
                        stopped.add(i)
                time.sleep(0.02)
        finally:
            for i in stopped:
                procs[i].send_signal(signal.SIGCONT)
        outs = [p.communicate(timeout=300) for p in procs]
    assert overlapped, "the two jobs never ran at the same time"
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    ports = [json.loads(o[0])["remote"]["nbd"][0].rsplit(":", 1)[1] for o in outs]
    assert len(set(ports)) == 2 and str(base) not in ports, ports
    for dom in doms:
        _nothing_left(dom)
        work = tmp_path / f"work-{dom.name}"
        work.mkdir()
        check_restored(tmp_path / dom.name, "virtnbdbackup.0", snap_all(dom, "now"), work)


def test_refusals_fail_clearly_and_leave_nothing(remote_lab: RemoteLab, make_domain, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", 4 * MiB)])
    dom.disk("sda").write_data(0, MiB, seed=3)
    checkpoints_before = sorted(c.getName() for c in dom.dom.listAllCheckpoints())

    def refused(*extra: str, tls: Path | None = None, known_hosts: Path | None = None) -> str:
        folder = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        proc = _run(_cmd(remote_lab, dom, "full", folder, *extra, tls=tls, known_hosts=known_hosts))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert not (folder / "virtnbd.manifest.json").exists()
        assert not list(folder.glob("*.data")) if folder.exists() else True
        _nothing_left(dom)
        assert sorted(c.getName() for c in dom.dom.listAllCheckpoints()) == checkpoints_before
        return error_line(proc.stderr)

    # host keys: checked before libvirt or any disk is touched
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    assert "host key of localhost" in refused(known_hosts=empty) and "unknown" in refused(known_hosts=empty)
    assert "CHANGED" in refused(known_hosts=remote_lab.changed_known_hosts)
    # a client certificate of another CA (our CA file is right): the server refuses the client
    wrong = tmp_path / "wrong-client"
    wrong.mkdir(mode=0o700)
    shutil.copy(remote_lab.client_tls / "ca-cert.pem", wrong)
    for name in ("client-cert.pem", "client-key.pem"):
        shutil.copy(remote_lab.foreign_tls / name, wrong)
    line = refused(tls=wrong)
    assert "refused our TLS client certificate" in line, line
    # a CA file that did not sign the server's certificate: we refuse the server
    line = refused(tls=remote_lab.foreign_tls)
    assert "not signed by the CA" in line, line
    # a name the server certificate does not carry (vm resolves to 127.0.0.1 here; the cert says localhost)
    line = refused("--nbd-ip", socket_hostname())
    assert "does not match the name" in line, line
    # no client certificate at all
    line = refused(tls=tmp_path)
    assert "client-cert.pem" in line and "--no-tls" in line, line


def socket_hostname() -> str:
    import socket

    return socket.gethostname()


def test_no_tls_works_and_warns(remote_lab: RemoteLab, make_domain, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A job without TLS needs a host whose qemu.conf does not demand it; here QEMU's export is plain TCP
    (tls='no' in the job XML), which the lab's libvirt accepts alongside its TLS default."""
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", 4 * MiB)])
    dom.disk("sda").write_data(MiB, MiB, seed=5)
    proc = _run(_cmd(remote_lab, dom, "full", tmp_path / "b", "--no-tls"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert "--no-tls" in proc.stderr and "unencrypted" in proc.stderr
    assert summary["remote"]["tls"] is False and summary["remote"]["nbd"][0].startswith("nbd://")
    assert any("unencrypted" in n for n in summary["notes"])
    _nothing_left(dom)
    check_restored(tmp_path / "b", "virtnbdbackup.0", snap_all(dom, "now"), tmp_path)


@pytest.mark.parametrize("state", ["running", "shut-off"])
def test_sigkill_leaves_nothing_on_the_remote(remote_lab: RemoteLab, make_domain, tmp_path: Path,  # type: ignore[no-untyped-def]
                                             state: str) -> None:
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", 32 * MiB)])
    dom.disk("sda").write_data(0, 24 * MiB, seed=9)
    if state == "shut-off":
        dom.stop()
    # slow reads keep the run inside its copy long enough to be killed there
    proc = subprocess.Popen(_cmd(remote_lab, dom, "full", tmp_path / "b", "--read-size", "4K"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (job_running(dom) if state == "running" else _qemu_nbd_of(dom)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    _nothing_left(dom, wait=30)
