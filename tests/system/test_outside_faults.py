"""Faults from outside the process (issue 21): another process holds the image, storage fills or turns
read-only, QEMU dies, the guest powers off, someone else runs a block job. Each test takes a before/after
inventory (tests/lab/inventory.py) and proves the next run exact by bytes."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.lab import inventory
from tests.lab.fault_lab import SmallFs, fill_fs, mount_fragile_ext4, mount_small_fs, repair, turn_read_only
from tests.lab.libvirt_lab import DiskSpec, LabDomain, MiB, pids_of, restart_libvirtd
from tests.system.backup_helpers import backup_cmd, check_point, env, ok
from tests.system.chain_helpers import checkpoint_names, error_line, fails, points, snap_all, write_all

pytestmark = pytest.mark.system

SIZE = 16 * MiB
SAFE = ("data", "data", "pattern", "zero")


def _write(dom: LabDomain, seed: int) -> None:
    write_all(dom, seed, 6, SAFE)


def _has_open(pid: int, path: Path) -> bool:
    with contextlib.suppress(OSError):
        return any(os.readlink(fd) == str(path) for fd in Path(f"/proc/{pid}/fd").iterdir())
    return False


@contextmanager
def _image_held(image: Path, how: str) -> Iterator[None]:
    """Another process holds the image: qemu-io read-write, or a read-only qemu-nbd export."""
    if how == "qemu-io":
        cmd = ["qemu-io", "-f", "qcow2", str(image)]
    else:
        cmd = ["qemu-nbd", "--read-only", "-f", "qcow2", f"--socket={image.parent / 'holder.sock'}", str(image)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10        # until the holder has the image open (probing would race it)
        while not _has_open(proc.pid, image):
            assert proc.poll() is None and time.monotonic() < deadline, f"{how} did not open {image}"
            time.sleep(0.02)
        yield
    finally:                                # qemu-io closes cleanly (bitmaps stored) at the end of its input
        if how == "qemu-io" and proc.stdin:
            proc.stdin.close()
        else:
            proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("holder", ["qemu-io", "qemu-nbd"])
def test_offline_full_on_locked_image_leaves_the_previous_chain(make_domain, tmp_path, holder) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)], start=False)
    old, new = dom.dir / "old-chain", dom.dir / "new-chain"
    expected = {}
    _write(dom, 1)
    ok(dom, "full", old)
    expected["virtnbdbackup.0"] = snap_all(dom, "p0")
    _write(dom, 2)
    ok(dom, "inc", old)
    expected["virtnbdbackup.1"] = snap_all(dom, "p1")
    before = inventory.take(dom, dom.dir, new)
    assert before.checkpoints == ("virtnbdbackup.0", "virtnbdbackup.1")

    with _image_held(dom.disk("sda").image, holder):
        line = error_line(fails(dom, "full", new))
    assert "in use by another process" in line and str(dom.disk("sda").image) in line, line
    after = inventory.take(dom, dom.dir, new)
    # the previous chain's checkpoints and bitmaps untouched; no job, no scratch; only the run log is new
    inventory.assert_same(before, after, allow=("folder",))
    assert inventory.folder_extra(before, after) == [], after.folder

    _write(dom, 3)                              # the old chain continues exactly
    assert ok(dom, "inc", old)["point"] == "virtnbdbackup.2"
    expected["virtnbdbackup.2"] = snap_all(dom, "p2")
    for point, images in expected.items():
        check_point(dom, old, point, images, tmp_path)

    # once the image is free, the new chain starts and replaces the old one in libvirt and the image
    assert ok(dom, "full", new)["point"] == "virtnbdbackup.0"
    fresh = {"virtnbdbackup.0": snap_all(dom, "n0")}
    assert checkpoint_names(dom) == ["virtnbdbackup.0"]
    assert dom.disk("sda").bitmaps() == ["virtnbdbackup.0"]
    _write(dom, 4)
    assert ok(dom, "inc", new)["point"] == "virtnbdbackup.1"
    fresh["virtnbdbackup.1"] = snap_all(dom, "n1")
    for point, images in fresh.items():
        check_point(dom, new, point, images, tmp_path)


def _start_frozen(dom: LabDomain, folder: Path, pattern: str = "*.partial", *extra: str,
                  where: Path | None = None, level: str = "inc") -> subprocess.Popen[str]:
    """Start a run (an inc) and freeze it (SIGSTOP) the moment ``pattern`` appears in ``where`` (the folder)."""
    proc = subprocess.Popen([*backup_cmd(dom, level, folder), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())
    assert _frozen_when(proc, where or folder, pattern), proc.communicate()
    return proc


def _frozen_when(proc: subprocess.Popen[str], folder: Path, pattern: str, timeout: float = 60) -> bool:
    """SIGSTOP the run as soon as ``pattern`` appears in ``folder``; False when it ended before."""
    deadline = time.monotonic() + timeout
    while not list(folder.glob(pattern)):
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGSTOP)
    return True


# moments of a running inc: (name, file whose appearance freezes the run, folder it appears in, signal)
MOMENTS = [
    ("before-job", "virtnbd.*", "scratch", signal.SIGKILL),              # scratch folder made, job not begun
    ("job-begun", "virtnbd.*/sda.scratch.qcow2", "scratch", signal.SIGTERM),  # libvirt made the scratch image
    ("mid-copy", "*.partial", "folder", signal.SIGTERM),
    ("mid-copy", "*.partial", "folder", signal.SIGKILL),
    ("before-commit", "vmconfig.virtnbdbackup.1.xml", "folder", signal.SIGKILL),  # job ended, side files
]


@pytest.mark.parametrize("case", MOMENTS, ids=[f"{m[0]}-{m[3].name}" for m in MOMENTS])
def test_libvirtd_restart_during_pull_backup(make_domain, tmp_path, case) -> None:  # type: ignore[no-untyped-def]
    moment, pattern, where, sig = case
    dom = make_domain(disks=[DiskSpec("sda", "virtio", "qcow2", 64 * MiB)])
    folder = dom.dir / "backup"
    _write(dom, 1)
    ok(dom, "full", folder)
    expected = {"virtnbdbackup.0": snap_all(dom, "p0")}
    dom.disk("sda").write_pattern(0, 48 * MiB, 0x5A)          # an inc long enough to catch mid-copy
    _write(dom, 2)
    at_start = snap_all(dom, "p1")

    proc = _start_frozen(dom, folder, pattern, where=dom.dir if where == "scratch" else folder)
    restart_libvirtd(sig)                      # the run is frozen while libvirtd goes and comes back
    os.kill(proc.pid, signal.SIGCONT)
    resumed = time.monotonic()
    _out, err = proc.communicate(timeout=120)
    noticed = time.monotonic() - resumed
    dom.reconnect()
    assert "Traceback" not in err, err
    assert noticed < 5, f"the run took {noticed:.1f}s to end after libvirtd came back"
    if proc.returncode == 0:                    # the job had ended: the point is complete and committed
        assert moment == "before-commit" and points(folder) == ["virtnbdbackup.0", "virtnbdbackup.1"], err
        expected["virtnbdbackup.1"] = at_start
    else:
        assert "connection to libvirtd lost" in error_line(err), err
        assert points(folder) == ["virtnbdbackup.0"]               # no half point
    stray = inventory.take(dom, dom.dir, folder)

    _write(dom, 3)
    nxt = f"virtnbdbackup.{len(expected)}"
    assert ok(dom, "inc", folder)["point"] == nxt                 # aborts a stray job, continues the chain
    expected[nxt] = snap_all(dom, "p-next")
    after = inventory.take(dom, dom.dir, folder)
    assert not after.job and after.scratch == () and after.checkpoints == tuple(expected), (stray, after)
    assert not [n for n in after.folder if n.endswith(".partial")], (stray, after)
    for point, images in expected.items():
        check_point(dom, folder, point, images, tmp_path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_online_full_failing_after_job_start_leaves_the_previous_chain(make_domain, tmp_path, sig) -> None:  # type: ignore[no-untyped-def]
    """The new chain's job runs under checkpoint virtnbdbackup.pending; the previous chain is deleted and
    the pending checkpoint renamed to virtnbdbackup.0 only after the commit (docs/FAULTS.md, online 10)."""
    dom = make_domain(disks=[DiskSpec("sda", "virtio", "qcow2", 64 * MiB)])
    old, new = dom.dir / "old-chain", dom.dir / "new-chain"
    _write(dom, 1)
    ok(dom, "full", old)
    expected = {"virtnbdbackup.0": snap_all(dom, "p0")}
    _write(dom, 2)
    ok(dom, "inc", old)
    expected["virtnbdbackup.1"] = snap_all(dom, "p1")
    dom.disk("sda").write_pattern(0, 48 * MiB, 0x6B)          # a full long enough to stop mid-copy
    before = inventory.take(dom, dom.dir, old)

    proc = _start_frozen(dom, new, level="full")               # job begun, copying: then it fails
    during = inventory.take(dom, dom.dir, old)
    assert during.checkpoints == ("virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.pending"), during
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and points(new) == [], err
    after = inventory.take(dom, dom.dir, old)
    if sig == signal.SIGTERM:                  # the run cleaned up itself: exactly as before
        assert "Traceback" not in err, err
        inventory.assert_same(before, after)
    else:                                       # killed: its job and pending checkpoint are left to the next run
        assert after.checkpoints == during.checkpoints and after.job, after

    _write(dom, 3)                              # the previous chain continues exactly
    assert ok(dom, "inc", old)["point"] == "virtnbdbackup.2"
    expected["virtnbdbackup.2"] = snap_all(dom, "p2")
    tidy = inventory.take(dom, dom.dir, old)
    assert tidy.checkpoints == tuple(expected) and not tidy.job and tidy.scratch == (), tidy
    for point, images in expected.items():
        check_point(dom, old, point, images, tmp_path)

    # a full that commits replaces the previous chain: its pending checkpoint becomes virtnbdbackup.0
    assert ok(dom, "full", new)["point"] == "virtnbdbackup.0"
    fresh = {"virtnbdbackup.0": snap_all(dom, "n0")}
    switched = inventory.take(dom, dom.dir, new)
    assert switched.checkpoints == ("virtnbdbackup.0",), switched
    assert [names for _node, names in switched.live_bitmaps] == [("virtnbdbackup.0",)], switched
    saved = (new / "checkpoints" / "virtnbdbackup.0.xml").read_text()
    assert "<name>virtnbdbackup.0</name>" in saved and "<parent>" not in saved and "pending" not in saved
    _write(dom, 4)
    assert ok(dom, "inc", new)["point"] == "virtnbdbackup.1"
    fresh["virtnbdbackup.1"] = snap_all(dom, "n1")
    for point, images in fresh.items():
        check_point(dom, new, point, images, tmp_path)


def _qemu_pid(dom: LabDomain) -> int:
    return int(Path(f"/run/libvirt/qemu/{dom.name}.pid").read_text().strip())


@pytest.mark.parametrize("how", ["qemu-killed", "guest-off"])
def test_qemu_dies_or_guest_powers_off_during_the_job(make_domain, tmp_path, how) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "virtio", "qcow2", 64 * MiB)])
    folder = dom.dir / "backup"
    _write(dom, 1)
    ok(dom, "full", folder)
    expected = {"virtnbdbackup.0": snap_all(dom, "p0")}
    dom.disk("sda").write_pattern(0, 48 * MiB, 0x3C)
    _write(dom, 2)
    dom.disk("sda").flush()
    proc = _start_frozen(dom, folder)
    if how == "qemu-killed":
        os.kill(_qemu_pid(dom), signal.SIGKILL)
    else:
        dom.stop()                              # SIGTERM: QEMU quits cleanly, like a guest powering off
    deadline = time.monotonic() + 30
    while dom.is_active() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGCONT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err, err
    line = error_line(err)
    assert "sda" in line, line
    assert points(folder) == ["virtnbdbackup.0"]
    after = inventory.take(dom, dom.dir, folder)
    assert not after.job and after.scratch == ()

    _write(dom, 3)                              # written while off
    stored = dict(dict(after.image_bitmaps)["sda"])
    lost = "virtnbdbackup.0" not in stored or "in-use" in stored["virtnbdbackup.0"]
    if how == "qemu-killed":
        assert lost, after                      # never stored, or stored in-use
    # A clean power-off stores the bitmaps and the chain continues offline. On a loaded machine
    # QEMU may not finish quitting within libvirt's SIGTERM grace and is killed: then the bitmaps
    # are lost as after a crash, and the next run must say so and restart the chain (checked below).
    if lost:                                    # bitmaps of the session lost: the chain restarts, said so
        summary = ok(dom, "auto", folder)
        assert summary["level"] == "full" and "chain broken" in summary["notes"][0], summary
        archived = next(folder.glob("chain-*"))
        check_point(dom, archived, "virtnbdbackup.0", expected["virtnbdbackup.0"], tmp_path)
        expected = {"virtnbdbackup.0": snap_all(dom, "n0")}
    else:                                       # bitmaps stored cleanly: the chain continues offline
        assert ok(dom, "inc", folder)["point"] == "virtnbdbackup.1"
        expected["virtnbdbackup.1"] = snap_all(dom, "p1")
    final = inventory.take(dom, dom.dir, folder)
    assert not [n for n in final.folder if n.endswith(".partial")] and final.scratch == ()
    for point, images in expected.items():
        check_point(dom, folder, point, images, tmp_path)


def test_scratch_area_fills_during_the_job(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "virtio", "qcow2", 64 * MiB)], start=False)
    fs = mount_small_fs(dom.dir, 2 * MiB)       # QEMU (libvirt-qemu) must reach it: in the lab folder,
    try:                                        # mounted before QEMU starts (its mount namespace copies ours)
        dom.start()
        _scratch_fills(dom, fs.path, tmp_path)
    finally:
        fs.unmount()


def _scratch_fills(dom: LabDomain, scratch: Path, tmp_path: Path) -> None:
    folder = dom.dir / "backup"
    sda = dom.disk("sda")
    sda.write_pattern(0, 48 * MiB, 0x11)
    _write(dom, 1)
    ok(dom, "full", folder)
    expected = {"virtnbdbackup.0": snap_all(dom, "p0")}
    _write(dom, 2)
    expected_p1 = snap_all(dom, "p1")
    before = inventory.take(dom, scratch, folder)
    proc = _start_frozen(dom, folder, "*.partial", "--scratchdir", str(scratch), "--socketfile", str(dom.socket_path()))
    with pytest.raises(Exception, match="No space left"):   # QEMU 7.2 fails the guest's write, not the job
        sda.write_pattern(0, 8 * MiB, 0x22)             # copy-before-write needs 8 MiB of the 2 MiB scratch
    os.kill(proc.pid, signal.SIGCONT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err                    # the point is the disk at job start, exact
    expected["virtnbdbackup.1"] = expected_p1
    after = inventory.take(dom, scratch, folder)
    assert not after.job and after.scratch == () and before.scratch == ()
    assert after.checkpoints == ("virtnbdbackup.0", "virtnbdbackup.1")
    for point, images in expected.items():
        check_point(dom, folder, point, images, tmp_path)


def test_foreign_block_copy_is_refused_clearly(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "virtio", "qcow2", 16 * MiB)])
    folder = dom.dir / "backup"
    _write(dom, 1)
    ok(dom, "full", folder)
    expected = {"virtnbdbackup.0": snap_all(dom, "p0")}
    _write(dom, 2)
    copy = dom.dir / "mirror.qcow2"
    res = subprocess.run(["virsh", "-q", "blockcopy", dom.name, "sda", str(copy), "--transient-job"],
                         check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    try:
        before = inventory.take(dom, dom.dir, folder)
        line = error_line(fails(dom, "inc", folder))
        assert "block copy job started by someone else" in line and "sda" in line, line
        # an online full into a new folder is refused before it deletes the previous chain's checkpoints
        line = error_line(fails(dom, "full", dom.dir / "new-chain"))
        assert "block copy job started by someone else" in line, line
        after = inventory.take(dom, dom.dir, folder)
        inventory.assert_same(before, after, allow=("folder",))
        assert inventory.folder_extra(before, after) == []
    finally:
        subprocess.run(["virsh", "-q", "blockjob", dom.name, "sda", "--abort"], check=True, capture_output=True,
                       timeout=60)
    assert ok(dom, "inc", folder)["point"] == "virtnbdbackup.1"
    expected["virtnbdbackup.1"] = snap_all(dom, "p1")
    for point, images in expected.items():
        check_point(dom, folder, point, images, tmp_path)


def _job_kind(dom: LabDomain) -> int:
    """The domain's job type; NONE while libvirt's state lock is busy (the job is still being set up: on a
    loaded machine a snapshot's start held it past libvirt's 30 s wait)."""
    import libvirt

    try:
        return int(dom.dom.jobInfo()[0])
    except libvirt.libvirtError as err:
        if "state change lock" not in str(err):
            raise
        return libvirt.VIR_DOMAIN_JOB_NONE


@contextmanager
def _domain_job_held(dom: LabDomain, kind: str) -> Iterator[None]:
    """A real libvirt domain job (save, or an external memory snapshot) kept running: it writes the guest's
    memory into a FIFO that is opened but never read, so QEMU blocks once the pipe is full."""
    import libvirt

    fifo = dom.dir / f"{kind}.fifo"
    os.mkfifo(fifo, 0o666)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    cmd = (["virsh", "-q", "save", dom.name, str(fifo)] if kind == "save" else
           ["virsh", "-q", "snapshot-create-as", dom.name, "vnbd-held", "--memspec",
            f"file={fifo},snapshot=external", "--diskspec", "sda,snapshot=no"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while _job_kind(dom) == libvirt.VIR_DOMAIN_JOB_NONE:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        yield
    finally:
        subprocess.run(["virsh", "-q", "domjobabort", dom.name], check=False, capture_output=True, timeout=60)
        os.close(reader)
        proc.communicate(timeout=60)
        fifo.unlink()


@pytest.mark.parametrize("kind", ["save", "snapshot"])
def test_foreign_domain_job_is_refused_clearly(make_domain, tmp_path, kind) -> None:  # type: ignore[no-untyped-def]
    """Someone else saves or snapshots the domain (a real job, held open): inc and full refused, naming it;
    nothing changed; the chain goes on exactly once the job is gone. A real migration needs a second host
    (libvirt refuses to migrate to itself): it is the same domain job, refused by the same check."""
    dom = make_domain(disks=[DiskSpec("sda", "virtio", "qcow2", 16 * MiB)])
    folder = dom.dir / "backup"
    _write(dom, 1)
    ok(dom, "full", folder)
    expected = {"virtnbdbackup.0": snap_all(dom, "p0")}
    _write(dom, 2)
    before = inventory.take(dom, dom.dir, folder)
    with _domain_job_held(dom, kind):
        for level, where in (("inc", folder), ("full", dom.dir / "new-chain")):
            line = error_line(fails(dom, level, where))
            assert f"running {kind} job started by someone else" in line and "virsh domjobinfo" in line, line
        assert inventory.take(dom, dom.dir, folder).checkpoints == before.checkpoints
    assert dom.is_active()                      # the aborted job left the domain running
    after = inventory.take(dom, dom.dir, folder)
    # the save/snapshot itself stores QEMU's bitmaps in the image (flagged in-use while QEMU runs on): not ours
    inventory.assert_same(before, after, allow=("folder", "image_bitmaps"))
    assert inventory.folder_extra(before, after) == []
    _write(dom, 3)
    assert ok(dom, "inc", folder)["point"] == "virtnbdbackup.1"
    expected["virtnbdbackup.1"] = snap_all(dom, "p1")
    for point, images in expected.items():
        check_point(dom, folder, point, images, tmp_path)


def test_backup_folder_turns_read_only_mid_run(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "virtio", "qcow2", 64 * MiB)])
    fs = mount_fragile_ext4(tmp_path, 128 * MiB)
    try:
        _folder_turns_read_only(dom, fs, tmp_path)
    finally:
        fs.unmount()


def _folder_turns_read_only(dom: LabDomain, fs: SmallFs, tmp_path: Path) -> None:
    _folder_fault_mid_copy(dom, fs.path / "backup", tmp_path, fault=lambda: turn_read_only(fs),
                           fix=lambda: repair(fs), message="read-only file system")


def _folder_fault_mid_copy(dom: LabDomain, folder: Path, tmp_path: Path, *, fault: Callable[[], object],
                           fix: Callable[[], object], message: str) -> None:
    """An inc frozen at its first partial file meets ``fault`` on the backup folder: one error line with
    ``message`` and the folder, no point, nothing changed outside it; after ``fix`` the next inc is exact."""
    _write(dom, 1)
    ok(dom, "full", folder)
    expected = {"virtnbdbackup.0": snap_all(dom, "p0")}
    dom.disk("sda").write_pattern(0, 48 * MiB, 0x77)
    _write(dom, 2)
    before = inventory.take(dom, dom.dir, folder)
    proc = _start_frozen(dom, folder)
    fault()
    os.kill(proc.pid, signal.SIGCONT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "Traceback" not in err, err
    line = error_line(err)
    assert message in line.lower() and str(folder) in line, line
    assert points(folder) == ["virtnbdbackup.0"]
    after = inventory.take(dom, dom.dir, folder)
    # outside the folder: no job, no scratch, the checkpoint of the failed run gone
    inventory.assert_same(before, after, allow=("folder",))

    fix()                                       # the admin fixes the filesystem; the next run goes on exactly
    _write(dom, 3)
    assert ok(dom, "inc", folder)["point"] == "virtnbdbackup.1"
    expected["virtnbdbackup.1"] = snap_all(dom, "p1")
    final = inventory.take(dom, dom.dir, folder)
    assert not [n for n in final.folder if n.endswith(".partial") or n.endswith(".tmp")], final.folder
    for point, images in expected.items():
        check_point(dom, folder, point, images, tmp_path)


def test_backup_folder_fills_up_mid_run(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Another writer fills the target's filesystem (tmpfs) while an inc is copying."""
    dom = make_domain(disks=[DiskSpec("sda", "virtio", "qcow2", 64 * MiB)])
    fs = mount_small_fs(dom.dir, 96 * MiB)
    filler = fs.path / "filler"
    try:
        _folder_fault_mid_copy(dom, fs.path / "backup", tmp_path, fault=lambda: fill_fs(fs.path, free=0),
                               fix=filler.unlink, message="no space left on device")
    finally:
        fs.unmount()


def test_killed_offline_full_leaves_only_its_pending_bitmap(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", 64 * MiB)], start=False)
    old, new = dom.dir / "old-chain", dom.dir / "new-chain"
    dom.disk("sda").write_pattern(0, 48 * MiB, 0x42)
    _write(dom, 1)
    ok(dom, "full", old)
    expected = {"virtnbdbackup.0": snap_all(dom, "p0")}
    before = inventory.take(dom, dom.dir, old)
    proc = subprocess.Popen(backup_cmd(dom, "full", new), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env())
    assert _frozen_when(proc, new, "*.partial"), proc.communicate()
    proc.kill()                                 # qemu-nbd follows (parent-death signal)
    proc.communicate(timeout=60)
    after = inventory.take(dom, dom.dir, old)
    changed = inventory.changes(before, after)              # as docs/FAULTS.md lists for a killed run:
    assert changed.pop("scratch") == ((), (f"virtnbd.{proc.pid}." + after.scratch[0].split(".")[2],))
    assert changed == {"image_bitmaps": (
        (("sda", (("virtnbdbackup.0", ("auto",)),)),),
        (("sda", (("virtnbdbackup.0", ("auto",)), ("virtnbdbackup.pending", ("auto",)))),))}

    dom.start()                                 # the old chain goes on online; pending bitmap and scratch dropped
    _write(dom, 2)
    assert ok(dom, "inc", old)["point"] == "virtnbdbackup.1"
    expected["virtnbdbackup.1"] = snap_all(dom, "p1")
    final = inventory.take(dom, dom.dir, old)
    assert [names for _node, names in final.live_bitmaps] == [("virtnbdbackup.0", "virtnbdbackup.1")], final
    assert final.scratch == () and not final.job
    for point, images in expected.items():
        check_point(dom, old, point, images, tmp_path)


def test_hung_libvirtd_is_noticed_by_keepalive(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "virtio", "qcow2", 64 * MiB)])
    folder = dom.dir / "backup"
    _write(dom, 1)
    ok(dom, "full", folder)
    expected = {"virtnbdbackup.0": snap_all(dom, "p0")}
    dom.disk("sda").write_pattern(0, 48 * MiB, 0x6B)
    _write(dom, 2)
    proc = _start_frozen(dom, folder)
    daemons = pids_of("libvirtd")
    for pid in daemons:                         # libvirtd hangs (answers nothing) while the run goes on
        os.kill(pid, signal.SIGSTOP)
    try:
        os.kill(proc.pid, signal.SIGCONT)
        resumed = time.monotonic()
        _out, err = proc.communicate(timeout=60)
        noticed = time.monotonic() - resumed
    finally:
        for pid in daemons:
            os.kill(pid, signal.SIGCONT)
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert "keepalive timeout" in error_line(err), err
    assert noticed < 15, f"{noticed:.1f}s"
    assert points(folder) == ["virtnbdbackup.0"]
    _write(dom, 3)
    assert ok(dom, "inc", folder)["point"] == "virtnbdbackup.1"
    expected["virtnbdbackup.1"] = snap_all(dom, "p1")
    after = inventory.take(dom, dom.dir, folder)
    assert not after.job and after.scratch == () and after.checkpoints == tuple(expected), after
    for point, images in expected.items():
        check_point(dom, folder, point, images, tmp_path)
