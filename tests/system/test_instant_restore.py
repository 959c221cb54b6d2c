"""virtnbdrestore -a instant on the lab's tiny real guest (qemu-guest-agent, ext4 data disk).

The guest writes a file, powers off, and is backed up offline: its disk file is then
exactly the point (the reference). What "exact" means while the guest runs:
* ``--paused``: the guest never runs before the switch-over, so the final image must
  ``qemu-img compare`` identical to the reference;
* running: the guest writes a file while the (bandwidth-limited) copy is still going;
  after the switch-over the final image holds the point plus that write: the guest reads
  it back, and a frozen-guest snapshot of the final image has it (debugfs) and passes e2fsck.
Kills (SIGTERM, SIGKILL) mid-copy: the new domain is gone, no nbdkit is left, no image
is left under its final name, no work folder, and the backup set is byte-unchanged.
"""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.lab.guest_lab import DATA_MOUNT, Guest, debugfs_cat, e2fsck_clean
from tests.lab.libvirt_lab import run
from tests.system.backup_helpers import REPO

pytestmark = [pytest.mark.system, pytest.mark.guest]

MiB = 1024 * 1024
MARKER = "written in the guest before the backup"
BLOB = hashlib.sha256(b"instant").digest() * (8 * MiB // 32)     # 8 MiB: the copy at 1 MiB/s takes ~9 s


NORMAL_START: list[float] = []          # the original's start to its agent's answer (the reference)


def _restore_cmd(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "virtnbdrestore"), "-n", *args]


def _sha_files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _nbdkit_serving(folder: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"nbdkit") and f"set={folder}".encode() in argv:
                pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def point(libvirt_conn: Any, guest_build: Any) -> Iterator[tuple[Guest, Path, Path]]:
    """(the powered-off original, its backup set, the disk as raw at the point)."""
    orig = Guest(libvirt_conn, guest_build, files={"blob.bin": BLOB}, nic=True)
    try:
        t0 = time.monotonic()
        orig.start()
        NORMAL_START.append(time.monotonic() - t0)
        orig.write_file(f"{DATA_MOUNT}/before.txt", MARKER)
        orig.sync()
        orig.dom.destroy()
        folder = orig.dir / "backup"
        subprocess.run([sys.executable, str(REPO / "virtnbdbackup"), "-d", orig.name, "-l", "full", "-o",
                        str(folder), "-n", "--scratchdir", str(orig.dir)], check=True, capture_output=True,
                       timeout=300)
        ref = orig.dir / "point.raw"
        run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(orig.disk), str(ref)])
        yield orig, folder, ref
    finally:
        orig.remove()


class Instant:
    """One ``virtnbdrestore -a instant`` run in the background."""

    def __init__(self, folder: Path, out: Path, *extra: str) -> None:
        self.name = f"vnbdtest-i{uuid.uuid4().hex[:8]}"
        self.out = out
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(_restore_cmd("-a", "instant", "-i", str(folder), "-o", str(out),
                                                  "-N", self.name, *extra),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_line(self, text: str, timeout: float = 120) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if text in line:
                return line
            if not line and self.proc.poll() is not None:
                break
        err = self.proc.stderr.read() if self.proc.stderr else ""
        raise AssertionError(f"no {text!r}; rc {self.proc.poll()}; stderr: {err}")

    def finish(self, timeout: float = 180) -> str:
        out, err = self.proc.communicate(timeout=timeout)
        assert self.proc.returncode == 0, err
        return out

    def cleanup(self, conn: Any) -> None:
        import libvirt

        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        try:
            dom = conn.lookupByName(self.name)
        except libvirt.libvirtError:
            return
        if dom.isActive():
            dom.destroy()
        dom.undefine()


def _wait_job(dom: Any, timeout: float = 30) -> None:
    """Until the block copy of vda exists (the command prints its line just before it starts the copy)."""
    deadline = time.monotonic() + timeout
    while not dom.blockJobInfo("vda", 0):
        assert time.monotonic() < deadline, "no block copy started"
        time.sleep(0.05)


def _copying(dom: Any) -> bool:
    info = dom.blockJobInfo("vda", 0)
    return bool(info) and info["cur"] < info["end"]


def _check_switched(conn: Any, name: str, final: Path, orig: Guest) -> None:
    import libvirt

    dom = conn.lookupByName(name)
    for flags in (0, libvirt.VIR_DOMAIN_XML_INACTIVE):
        root = etree.fromstring(dom.XMLDesc(flags).encode())
        assert root.xpath("devices/disk/source/@file") == [str(final)]
        assert not root.xpath("devices/disk//source[@protocol='nbd']")
    orig_root = etree.fromstring(orig.dom.XMLDesc(0).encode())
    assert root.findtext("uuid") != orig_root.findtext("uuid")
    assert root.xpath("devices/interface/mac/@address") != orig_root.xpath("devices/interface/mac/@address")


def test_instant_paused_copy_is_exact(point: tuple[Guest, Path, Path], libvirt_conn: Any) -> None:
    orig, folder, ref = point
    before = _sha_files(folder)
    run_ = Instant(folder, orig.dir / "paused", "--paused")
    try:
        run_.finish()
        final = run_.out / "vda.qcow2"
        _check_switched(libvirt_conn, run_.name, final, orig)
        run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", str(ref), str(final)])   # exit 1: differs
        assert not _nbdkit_serving(folder)
        assert sorted(p.name for p in run_.out.iterdir() if not p.name.endswith(".log")) == ["vda.qcow2"]
        guest = Guest.attach(libvirt_conn, run_.name)
        guest.dom.resume()
        guest.wait_answer()
        assert guest.sh(f"cat {DATA_MOUNT}/before.txt") == MARKER
    finally:
        run_.cleanup(libvirt_conn)
    assert _sha_files(folder) == before


def test_instant_runs_at_once_and_keeps_writes_made_during_the_copy(
        point: tuple[Guest, Path, Path], libvirt_conn: Any, tmp_path: Path) -> None:

    orig, folder, _ref = point
    before = _sha_files(folder)
    run_ = Instant(folder, orig.dir / "live", "--bandwidth", "1")
    try:
        run_.wait_line("running on the backup")
        guest = Guest.attach(libvirt_conn, run_.name)
        _wait_job(guest.dom)
        # the test holds the switch-over back (the command stopped: QEMU keeps copying and mirroring, nbdkit
        # keeps serving) until the guest wrote, so the write surely lands before the switch-over. Throttling
        # the copy with blockJobSetSpeed did not hold it on an idle machine (switched over after 4 s).
        os.kill(run_.proc.pid, signal.SIGSTOP)
        try:
            guest.wait_answer()
            to_agent = time.monotonic() - run_.t0
            assert guest.sh(f"cat {DATA_MOUNT}/before.txt") == MARKER
            assert guest.dom.blockJobInfo("vda", 0), "the copy ended before the guest wrote: the test proves nothing"
            guest.write_file(f"{DATA_MOUNT}/during.txt", "written during the copy")
            guest.sync()
            assert guest.dom.blockJobInfo("vda", 0), "the copy ended before the guest's write was synced"
            # the write landed during the throttled copy: the rest of the copy need not crawl at 1 MiB/s
            guest.dom.blockJobSetSpeed("vda", 0, 0)
        finally:
            os.kill(run_.proc.pid, signal.SIGCONT)
        out = run_.finish()
        assert "switched over" in out
        final = run_.out / "vda.qcow2"
        _check_switched(libvirt_conn, run_.name, final, orig)
        assert not _nbdkit_serving(folder)
        assert guest.sh(f"cat {DATA_MOUNT}/during.txt") == "written during the copy"
        guest.agent("guest-fsfreeze-freeze")
        try:
            snap = tmp_path / "final.raw"
            run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(final), str(snap)])
        finally:
            guest.agent("guest-fsfreeze-thaw")
        clean, report = e2fsck_clean(snap)
        assert clean, report
        assert debugfs_cat(snap, "/during.txt") == b"written during the copy"
        assert debugfs_cat(snap, "/before.txt") == MARKER.encode()
        assert debugfs_cat(snap, "/blob.bin") == BLOB
        print(f"instant restore: agent answered {to_agent:.1f} s after the command; normal start "
              f"{NORMAL_START[0]:.1f} s; ratio {to_agent / NORMAL_START[0]:.2f} (goal <= 2, reported only)")
    finally:
        run_.cleanup(libvirt_conn)
    assert _sha_files(folder) == before


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_instant_killed_mid_copy_leaves_nothing(point: tuple[Guest, Path, Path], libvirt_conn: Any,
                                                signum: int) -> None:
    import libvirt

    orig, folder, _ref = point
    before = _sha_files(folder)
    out = orig.dir / f"kill{signum}"
    run_ = Instant(folder, out, "--bandwidth", "1", "--paused")
    try:
        run_.wait_line("on the backup")
        dom = libvirt_conn.lookupByName(run_.name)
        _wait_job(dom)
        assert _copying(dom)
        run_.proc.send_signal(signum)
        _out, err = run_.proc.communicate(timeout=60)
        assert run_.proc.returncode == (128 + signum if signum == signal.SIGTERM else -signum), err
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:       # after SIGKILL the guard cleans up
            names = [d.name() for d in libvirt_conn.listAllDomains()]
            if run_.name not in names and not _nbdkit_serving(folder) and not list(out.glob("vda.*")):
                break
            time.sleep(0.5)
        assert run_.name not in [d.name() for d in libvirt_conn.listAllDomains()]
        assert not _nbdkit_serving(folder)
        assert not list(out.glob("vda.*")) and not list(out.glob(".virtnbd-live-*"))
        assert ("interrupted by signal SIGTERM" if signum == signal.SIGTERM else
                "killed before the switch-over: domain") in err, err
    finally:
        with pytest.raises(libvirt.libvirtError):
            libvirt_conn.lookupByName(run_.name)
        run_.cleanup(libvirt_conn)
    assert _sha_files(folder) == before
    assert os.path.exists(folder)


def test_instant_no_migrate_runs_on_the_backup_until_stopped(point: tuple[Guest, Path, Path],
                                                             libvirt_conn: Any) -> None:
    orig, folder, _ref = point
    before = _sha_files(folder)
    run_ = Instant(folder, orig.dir / "nomigrate", "--no-migrate", "--paused")
    try:
        run_.wait_line("on the backup")
        dom = libvirt_conn.lookupByName(run_.name)
        root = etree.fromstring(dom.XMLDesc(0).encode())
        assert not dom.isPersistent() and root.xpath("devices/disk//source[@protocol='nbd']")
        assert _nbdkit_serving(folder)
        time.sleep(1.0)
        assert run_.proc.poll() is None                  # serves until stopped
        run_.proc.send_signal(signal.SIGTERM)
        _out, err = run_.proc.communicate(timeout=60)
        assert run_.proc.returncode == 128 + signal.SIGTERM, err
        assert run_.name not in [d.name() for d in libvirt_conn.listAllDomains()]
        assert not _nbdkit_serving(folder) and not (orig.dir / "nomigrate" / "vda.qcow2").exists()
    finally:
        run_.cleanup(libvirt_conn)
    assert _sha_files(folder) == before


# --------------------------------------------------------------------------- drill


def _drill(folder: Path, name: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(_restore_cmd("-a", "drill", "-i", str(folder), "-N", name, "--json",
                                         "--boot-timeout", "120", *extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _live_xml(conn: Any, name: str, proc: subprocess.Popen[str]) -> tuple[str, bool]:
    """The drill domain's live XML and whether it is persistent, caught while it runs."""
    import libvirt

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            dom = conn.lookupByName(name)
            return dom.XMLDesc(0), bool(dom.isPersistent())
        except libvirt.libvirtError:
            time.sleep(0.1)
    proc.kill()
    out, err = proc.communicate()
    raise AssertionError(f"drill domain {name} never seen: rc {proc.returncode}; {out} {err}")


def _drilled(conn: Any, folder: Path, check: str) -> tuple[dict[str, Any], int, str, bool]:
    import json

    name = f"vnbdtest-d{uuid.uuid4().hex[:8]}"
    proc = _drill(folder, name, "--check", check)
    xml, persistent = _live_xml(conn, name, proc)
    out, err = proc.communicate(timeout=300)
    assert name not in [d.name() for d in conn.listAllDomains()]
    assert not _nbdkit_serving(folder)
    return json.loads(out), proc.returncode, xml + err, persistent


CHECK = f"grep -q ' {DATA_MOUNT} ' /proc/mounts && cat {DATA_MOUNT}/before.txt"


def test_drill_of_a_good_point_passes(point: tuple[Guest, Path, Path], libvirt_conn: Any) -> None:
    orig, folder, _ref = point
    before = _sha_files(folder)
    result, rc, xml, persistent = _drilled(libvirt_conn, folder, CHECK)
    assert rc == 0 and result["result"] == "pass", result
    assert result["check_exitcode"] == 0 and result["point"] == "virtnbdbackup.0"
    assert set(result["seconds"]) == {"boot", "agent", "check", "total"}
    root = etree.fromstring(xml.split("</domain>")[0].encode() + b"</domain>")
    assert not persistent and not root.xpath("devices/interface")             # throw-away and isolated
    assert root.findtext("uuid") != etree.fromstring(orig.dom.XMLDesc(0).encode()).findtext("uuid")
    assert root.xpath("devices/disk//source[@protocol='nbd']")                 # the set itself is only served
    _check_recorded(folder, before, "pass")


def _check_recorded(folder: Path, before: dict[str, str], result: str) -> None:
    """The set's files unchanged but the manifest, whose point now lists the drill (restore.drilllog)."""
    import json

    manifest = "virtnbd.manifest.json"
    after = _sha_files(folder)
    assert {k: v for k, v in after.items() if k != manifest} == {k: v for k, v in before.items() if k != manifest}
    drills = json.loads((folder / manifest).read_text())["points"][-1]["extra"]["drills"]
    assert drills[-1]["result"] == result and set(drills[-1]["seconds"]) >= {"boot", "agent", "total"}


def test_drill_of_an_unbootable_point_fails_with_the_reason(libvirt_conn: Any, guest_build: Any) -> None:
    broken = Guest(libvirt_conn, guest_build)          # defined, never started: its disk is the point
    try:
        run(["qemu-io", "-f", "qcow2", "-c", "write -z 0 64k", str(broken.disk)])     # no ext4 superblock
        folder = broken.dir / "backup"
        subprocess.run([sys.executable, str(REPO / "virtnbdbackup"), "-d", broken.name, "-l", "full", "-o",
                        str(folder), "-n", "--scratchdir", str(broken.dir)], check=True, capture_output=True,
                       timeout=300)
        before = _sha_files(folder)
        result, rc, err, _persistent = _drilled(libvirt_conn, folder, CHECK)
        assert rc == 1 and result["result"] == "fail", result
        assert result["check_exitcode"] == 1 and "the check command exited 1" in result["reason"]
        assert "drill failed: the check command exited 1" in err
        assert result["recorded"] is True
        _check_recorded(folder, before, "fail")
    finally:
        broken.remove()
