"""Full output disk, read-only folder, file modes, secrets: clear errors, nothing half-committed."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.lab.fault_lab import fill_fs
from tests.lab.libvirt_lab import DiskSpec, MiB, run
from tests.system.backup_helpers import check_point, job_running, ok
from tests.system.chain_helpers import checkpoint_names, error_line, fails, points

pytestmark = pytest.mark.system

SIZE = 16 * MiB


def _modes(folder: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        found[str(path.relative_to(folder))] = stat.S_IMODE(path.stat().st_mode)
    return found


def test_enospc_fails_clearly_commits_nothing_and_next_run_works(make_domain, small_fs, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    sda = dom.disk("sda")
    mount = small_fs(24 * MiB, "ext4")
    folder = mount / "backup"
    sda.write_data(0, MiB, seed=1)
    ok(dom, "full", folder)
    p0 = sda.snapshot("p0")

    filler = fill_fs(mount, free=256 * 1024)
    sda.write_data(2 * MiB, 6 * MiB, seed=2)
    stderr = fails(dom, "inc", folder)
    line = error_line(stderr)
    assert "no space left on device" in line, line
    assert "Logging error" not in stderr, stderr
    assert points(folder) == ["virtnbdbackup.0"]
    assert not list(folder.glob("*.partial")) and not list(folder.glob(".*.tmp"))
    assert not job_running(dom)
    assert checkpoint_names(dom) == ["virtnbdbackup.0"]

    filler.unlink()                       # space is back: the next inc has every change since the full
    sda.write_data(10 * MiB, MiB, seed=3)
    assert ok(dom, "inc", folder)["point"] == "virtnbdbackup.1"
    check_point(dom, folder, "virtnbdbackup.0", {"sda": p0}, tmp_path)
    check_point(dom, folder, "virtnbdbackup.1", {"sda": sda.snapshot("p1")}, tmp_path)


def test_read_only_folder_is_one_clear_error(make_domain, small_fs) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    mount = small_fs(4 * MiB, "tmpfs")
    (mount / "backup").mkdir()
    run(["mount", "-o", "remount,ro", str(mount)])
    line = error_line(fails(dom, "full", mount / "backup"))
    assert str(mount / "backup") in line and ("not writable" in line or "read-only" in line.lower()), line
    assert checkpoint_names(dom) == []


def test_files_private_by_default_umask_option_and_no_secrets(make_domain) -> None:  # type: ignore[no-untyped-def]
    import libvirt
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)], start=False)
    secret = "Vq8sEcr7"   # VNC allows 8 characters
    xml = dom.xml(libvirt.VIR_DOMAIN_XML_INACTIVE).replace(
        "</devices>", f"<graphics type='vnc' autoport='yes' listen='127.0.0.1' passwd='{secret}'/></devices>")
    dom.dom = dom.conn.defineXML(xml)
    dom.start()
    dom.disk("sda").write_data(0, MiB, seed=1)
    private, shared = dom.dir / "private", dom.dir / "shared"
    ok(dom, "full", private)
    ok(dom, "inc", private)
    found = _modes(private)
    dirs = {k for k in found if (private / k).is_dir()}
    assert {k: v for k, v in found.items() if k in dirs} == dict.fromkeys(dirs, 0o700), found
    assert {k: v for k, v in found.items() if k not in dirs} == {k: 0o600 for k in found if k not in dirs}, found
    assert any(k.endswith(".log") for k in found) and "virtnbd.manifest.json" in found

    ok(dom, "full", shared, "--umask", "022")
    found = _modes(shared)
    assert {v for k, v in found.items() if (shared / k).is_dir()} == {0o755}, found
    assert {v for k, v in found.items() if not (shared / k).is_dir()} == {0o644}, found

    # the password is in libvirt's secure XML, never in anything the backup wrote
    assert secret in dom.xml(libvirt.VIR_DOMAIN_XML_SECURE)
    hits = subprocess.run(["grep", "-rl", secret, str(private), str(shared)], capture_output=True, text=True,
                          check=False)
    assert hits.stdout == "", hits.stdout
    assert os.path.exists(private / "vmconfig.virtnbdbackup.0.xml")


def test_lock_of_live_process_respected_of_dead_one_taken_over(make_domain) -> None:  # type: ignore[no-untyped-def]
    import signal
    import sys
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    folder = dom.dir / "backup"
    folder.mkdir(mode=0o700)
    holder_code = ("import fcntl, os, sys, time\n"
                   f"fd = os.open({str(folder / '.virtnbdbackup.lock')!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
                   "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                   "os.write(fd, f'{os.getpid()}\\n'.encode())\n"
                   "print('locked', flush=True)\n"
                   "time.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", holder_code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        line = error_line(fails(dom, "full", folder))
        assert f"locked by running process {holder.pid}" in line, line
        assert points(folder) == [] and checkpoint_names(dom) == []
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the holder died with the lock file still naming it: the next run takes the folder over
    assert str(holder.pid) in (folder / ".virtnbdbackup.lock").read_text()
    assert ok(dom, "full", folder)["point"] == "virtnbdbackup.0"
