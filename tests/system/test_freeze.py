"""Application-consistent backups, proven inside a real booted guest (tests/lab/guest_lab.py).

The guest writes files WITHOUT sync (they sit in its page cache); a backup
taken with freeze must hold them, one taken with --no-freeze right after must
not. Everything goes through ./virtnbdbackup and ./virtnbdrestore; the
restored images are read with debugfs and checked with e2fsck, no mounting.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.lab.guest_lab import DATA_MOUNT, GUEST_HOSTNAME, Guest, debugfs_cat, e2fsck_clean, recovered_copy
from tests.lab.libvirt_lab import LabDomain
from tests.system.backup_helpers import job_running

pytestmark = [pytest.mark.system, pytest.mark.guest]


@pytest.fixture
def guest(module_guest: Guest) -> Guest:
    """The booted guest this module shares (tests/lab/guest_lab.py)."""
    return module_guest

REPO = Path(__file__).resolve().parents[2]
MiB = 1024 * 1024


def cli(tool: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run ./virtnbdbackup or ./virtnbdrestore; a run that hangs fails the test with its thread stacks."""
    cmd = [sys.executable, str(REPO / tool), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)    # faulthandler prints every thread's stack
        out, err = proc.communicate()
        pytest.fail(f"{tool} hung for {timeout:.0f}s: {' '.join(args)}\n{err[-8000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def backup(guest: Guest | LabDomain, folder: Path, level: str, *extra: str,
           rc: int | None = 0) -> subprocess.CompletedProcess[str]:
    proc = cli("virtnbdbackup", "-d", guest.name, "-l", level, "-o", str(folder), "-n", "--scratchdir", str(guest.dir),
               *extra, timeout=60)
    if rc is not None:
        assert proc.returncode == rc, f"virtnbdbackup -> {proc.returncode}, wanted {rc}:\n{proc.stderr}"
    return proc


def dump(folder: Path) -> list[dict[str, Any]]:
    proc = cli("virtnbdrestore", "-i", str(folder), "-a", "dump", "--json")
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout)["points"])


def restore_raw(folder: Path, out: Path, until: str | None = None) -> Path:
    proc = cli("virtnbdrestore", "-i", str(folder), "-o", str(out), "--format", "raw", "-n",
               *(["--until", until] if until else []))
    assert proc.returncode == 0, proc.stderr
    image = out / "vda.raw"
    assert image.exists(), f"no {image} after restore: {sorted(p.name for p in out.iterdir())}"
    return image


def assert_clean(image: Path) -> None:
    clean, out = e2fsck_clean(image)
    assert clean, f"e2fsck -fn {image}:\n{out}"
    assert "journal recovery" not in out, f"{image} needs journal recovery: not a quiesced filesystem\n{out}"


def guest_file(image: Path, name: str) -> bytes | None:
    return debugfs_cat(image, f"/{name}")




# --------------------------------------------------------------------------
# the point holds what the guest had written: freeze vs no freeze


def test_no_freeze_misses_unsynced_write(guest: Guest, tmp_path: Path) -> None:
    """Negative control: without freeze, a file still in the guest's page cache is not in the backup.

    A synced file written just before shows the method does see data that reached the disk.
    """
    guest.sh(f"echo synced-before > {DATA_MOUNT}/nf-synced.txt && sync")
    guest.write_file(f"{DATA_MOUNT}/nf-unsynced.txt", "only in the page cache")
    backup(guest, tmp_path / "b", "copy", "--no-freeze")
    assert guest.fsfreeze_status() == "thawed"
    (point,) = dump(tmp_path / "b")
    assert point["consistency"] == "crash"
    image = restore_raw(tmp_path / "b", tmp_path / "r")
    replayed = recovered_copy(image, tmp_path / "replayed.raw")   # what a mount (journal replay) would see
    for img in (image, replayed):
        assert guest_file(img, "nf-synced.txt") == b"synced-before\n"
        assert guest_file(img, "nf-unsynced.txt") in (None, b""), f"{img}: unsynced file reached the disk"


def test_freeze_captures_unsynced_write(guest: Guest, tmp_path: Path) -> None:
    guest.write_file(f"{DATA_MOUNT}/frozen.txt", "written without sync")
    proc = backup(guest, tmp_path / "b", "copy")
    assert "frozen for" in proc.stderr, proc.stderr
    assert guest.fsfreeze_status() == "thawed"   # thawed after a normal run
    (point,) = dump(tmp_path / "b")
    assert point["consistency"] == "filesystem"
    info = point["extra"]["guest_info"]
    assert info["hostname"] == GUEST_HOSTNAME
    assert info["os"]["id"] == "vnbdguest"
    assert [fs["mountpoint"] for fs in info["filesystems"]] == [DATA_MOUNT]
    image = restore_raw(tmp_path / "b", tmp_path / "r")
    assert guest_file(image, "frozen.txt") == b"written without sync"
    assert_clean(image)


def test_freeze_mountpoint_option(guest: Guest, tmp_path: Path) -> None:
    guest.write_file(f"{DATA_MOUNT}/mp.txt", "frozen by mountpoint")
    backup(guest, tmp_path / "b", "copy", "-F", DATA_MOUNT)
    assert dump(tmp_path / "b")[0]["consistency"] == "filesystem"
    image = restore_raw(tmp_path / "b", tmp_path / "r")
    assert guest_file(image, "mp.txt") == b"frozen by mountpoint"
    assert_clean(image)
    # a mountpoint the guest does not have: nothing frozen -> warning, crash-consistent
    proc = backup(guest, tmp_path / "b2", "copy", "-F", "/no/such/mount", "--strict", rc=2)
    assert "froze 0 filesystem(s) of 1 requested" in proc.stderr, proc.stderr
    assert dump(tmp_path / "b2")[0]["consistency"] == "crash"
    assert guest.fsfreeze_status() == "thawed"


def test_pause_instead_of_freeze(guest: Guest, tmp_path: Path) -> None:
    import libvirt

    proc = backup(guest, tmp_path / "b", "copy", "--pause", "--strict")
    assert "paused for" in proc.stderr, proc.stderr
    assert dump(tmp_path / "b")[0]["consistency"] == "paused"
    assert guest.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
    assert guest.sh("echo alive") == "alive\n"


def test_thawed_after_failed_backup_begin(guest: Guest, tmp_path: Path) -> None:
    """An occupied socket path (root's socket in a sticky folder: QEMU cannot replace it) fails backupBegin."""
    sock_path = guest.dir / "sock" / f"busy-{os.getpid()}.sock"
    with socket.socket(socket.AF_UNIX) as busy:
        busy.bind(str(sock_path))
        busy.listen()
        proc = backup(guest, tmp_path / "b", "full", "-f", str(sock_path), rc=1)
    sock_path.unlink(missing_ok=True)
    assert "frozen for" in proc.stderr, f"the guest was never frozen, the test proves nothing:\n{proc.stderr}"
    assert "cannot start backup job" in proc.stderr, proc.stderr
    assert guest.fsfreeze_status() == "thawed"
    assert guest.sh(f"echo still-writable > {DATA_MOUNT}/after-fail.txt && cat {DATA_MOUNT}/after-fail.txt") \
        == "still-writable\n"


def test_full_then_inc_of_booted_guest(guest: Guest, tmp_path: Path) -> None:
    folder = tmp_path / "chain"
    guest.sh(f"echo version-1 > {DATA_MOUNT}/changing.txt")
    guest.write_file(f"{DATA_MOUNT}/gone-later.txt", "removed before the inc")
    backup(guest, folder, "full")
    guest.write_file(f"{DATA_MOUNT}/changing.txt", "version-2")
    guest.sh(f"rm {DATA_MOUNT}/gone-later.txt && mkdir -p {DATA_MOUNT}/d && echo new > {DATA_MOUNT}/d/new.txt")
    guest.sh(f"dd if=/dev/urandom of={DATA_MOUNT}/blob bs=64k count=16 2>/dev/null")
    blob = guest.exec(["/bin/cat", f"{DATA_MOUNT}/blob"]).stdout
    assert len(blob) == MiB
    backup(guest, folder, "inc")
    points = dump(folder)
    assert [(p["level"], p["consistency"]) for p in points] == [("full", "filesystem"), ("inc", "filesystem")]

    inc = restore_raw(folder, tmp_path / "r-inc")
    assert_clean(inc)
    assert guest_file(inc, "changing.txt") == b"version-2"
    assert guest_file(inc, "gone-later.txt") is None
    assert guest_file(inc, "d/new.txt") == b"new\n"
    assert guest_file(inc, "blob") == blob

    full = restore_raw(folder, tmp_path / "r-full", until=points[0]["name"])
    assert_clean(full)
    assert guest_file(full, "changing.txt") == b"version-1\n"
    assert guest_file(full, "gone-later.txt") == b"removed before the inc"
    assert guest_file(full, "blob") is None


# --------------------------------------------------------------------------
# guests whose agent is missing or broken: warning, crash-consistent point


def test_domain_without_agent_channel(make_domain: Any, tmp_path: Path) -> None:
    """The channel is missing from the domain XML: that alone decides, so a lab domain without a guest OS
    (nothing to boot) proves it."""
    g = make_domain()
    proc = backup(g, tmp_path / "b", "full", "--strict", rc=2)
    assert "has no guest agent channel" in proc.stderr, proc.stderr
    (point,) = dump(tmp_path / "b")
    assert point["consistency"] == "crash"
    assert point["extra"]["guest_info"] == {}
    backup(g, tmp_path / "b2", "full")   # without --strict the warning does not fail the run


def test_hung_agent(make_guest: Any, tmp_path: Path) -> None:
    """qemu-ga stopped (SIGSTOP): the channel stays connected, nothing answers -> timeout, warning, crash."""
    g = make_guest()
    g.stop_agent("STOP")
    assert g.channel_state() == "connected"
    t0 = time.monotonic()
    proc = backup(g, tmp_path / "b", "full", "--strict", "--agent-timeout", "2", rc=2)
    elapsed = time.monotonic() - t0
    assert "no answer to guest-ping within 2s" in proc.stderr and "crash-consistent" in proc.stderr, proc.stderr
    assert elapsed < 30, f"a hung agent held the backup for {elapsed:.0f}s"
    (point,) = dump(tmp_path / "b")
    assert point["consistency"] == "crash"


def test_killed_agent(make_guest: Any, tmp_path: Path) -> None:
    """qemu-ga killed: libvirt sees the channel disconnected -> warning, crash; inc points too."""
    g = make_guest()
    folder = tmp_path / "b"
    backup(g, folder, "full", "--strict")
    g.stop_agent("KILL")
    deadline = time.monotonic() + 20
    while g.channel_state() != "disconnected":
        assert time.monotonic() < deadline, f"agent channel still {g.channel_state()!r}"
        time.sleep(0.2)
    proc = backup(g, folder, "inc", "--strict", rc=2)
    assert "is not connected" in proc.stderr and "crash-consistent" in proc.stderr, proc.stderr
    assert [p["consistency"] for p in dump(folder)] == ["filesystem", "crash"]


# --------------------------------------------------------------------------
# SIGTERM while the job runs


def test_sigterm_during_job_leaves_guest_thawed(guest: Guest, tmp_path: Path) -> None:
    """On the module's guest (no second boot): 16 MiB of random data keep the zstd -19 job running."""
    g = guest
    g.sh(f"dd if=/dev/urandom of={DATA_MOUNT}/big.bin bs=1M count=16 2>/dev/null && sync", timeout=120)
    folder = tmp_path / "b"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "virtnbdbackup"), "-d", g.name, "-l", "full", "-o", str(folder), "-n",
         "-z", "19", "--compress-method", "zstd", "--scratchdir", str(g.dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not job_running(g):
            assert proc.poll() is None, f"backup ended before its job was seen: {proc.communicate()}"
            assert time.monotonic() < deadline, "no backup job within 60s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "frozen for" in err, err
    assert g.fsfreeze_status() == "thawed"
    assert not job_running(g), "backup job left running"
    assert not (folder / "virtnbd.manifest.json").exists() or dump(folder) == []
    assert not list(g.dir.glob("virtnbd.*")), "scratch folder left behind"
