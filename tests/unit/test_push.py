"""Pure parts of push mode: the job XML, telling a stale push job's owner, QEMU reaching the folder."""
from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from lxml import etree

from virtnbd import errors
from virtnbd.backup.push import searchable, unsearchable_parent
from virtnbd.backupset.store import LOCK_FILE, folder_in_use
from virtnbd.cli.backup import parse
from virtnbd.virt import xmlbuild


def test_push_xml_full_and_incremental() -> None:
    disks = [xmlbuild.PushDisk("sda", "/b/sda.virtnbdbackup.1.qcow2.partial"),
             xmlbuild.PushDisk("sdb", "/b/sdb.virtnbdbackup.1.qcow2.partial", full=True)]
    root = etree.fromstring(xmlbuild.push_backup_xml(disks, ["sdc"], incremental="virtnbdbackup.0").encode())
    assert root.get("mode") == "push"
    assert root.findtext("incremental") == "virtnbdbackup.0"
    assert root.find("server") is None
    sda, sdb, sdc = root.findall("./disks/disk")
    assert (sda.get("name"), sda.get("backup"), sda.get("backupmode")) == ("sda", "yes", None)
    assert sdb.get("backupmode") == "full"
    assert sda.find("target").get("file") == "/b/sda.virtnbdbackup.1.qcow2.partial"
    assert sda.find("driver").get("type") == "qcow2"
    assert (sdc.get("name"), sdc.get("backup")) == ("sdc", "no")
    full = etree.fromstring(xmlbuild.push_backup_xml(disks[1:]).encode())
    assert full.find("incremental") is None and full.find("./disks/disk").get("backupmode") is None


def test_push_targets_read_back_and_pull_jobs_have_none() -> None:
    xml = xmlbuild.push_backup_xml([xmlbuild.PushDisk("sda", "/b/x.qcow2.partial")])
    assert xmlbuild.push_targets(xml) == ["/b/x.qcow2.partial"]
    pull = xmlbuild.backup_xml("/s/backup.sock", [xmlbuild.BackupDisk("sda", "/s/sda.scratch")])
    assert xmlbuild.push_targets(pull) == []


def test_folder_in_use_follows_another_process_lock(tmp_path: Path) -> None:
    assert not folder_in_use(tmp_path)                 # no lock file
    (tmp_path / LOCK_FILE).write_text("")
    assert not folder_in_use(tmp_path)                 # nobody holds it
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
        "print('held', flush=True); sys.stdin.read()"), str(tmp_path / LOCK_FILE)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert folder_in_use(tmp_path)
    finally:
        holder.communicate("")
    assert not folder_in_use(tmp_path)                 # a dead holder releases it


def test_own_lock_reads_as_in_use_so_abort_stale_is_told_its_folder(tmp_path: Path) -> None:
    """flock is per open file: our own lock looks taken; abort_stale gets our folder to tell them apart."""
    fd = os.open(tmp_path / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert folder_in_use(tmp_path)
    finally:
        os.close(fd)


def test_searchable_adds_only_search_bits_and_restores(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    folder.mkdir(mode=0o700)
    folder.chmod(0o700)
    with searchable(folder):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o711
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    with pytest.raises(RuntimeError), searchable(folder):
        raise RuntimeError("job failed")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_unsearchable_parent_is_named() -> None:
    base = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="push-test-"))   # every parent searchable by all
    locked = base / "locked"
    (locked / "inner").mkdir(parents=True)
    base.chmod(0o755)
    locked.chmod(0o700)
    uid, gid = 64055, 64055            # not the owner (root), not its group
    try:
        assert unsearchable_parent(locked / "inner" / "set", uid, gid) == locked
        locked.chmod(0o711)
        assert unsearchable_parent(locked / "inner" / "set", uid, gid) is None
    finally:
        shutil.rmtree(base)


def test_push_needs_qcow2_sets() -> None:
    with pytest.raises(errors.UsageError, match="use -t qcow2 --push"):
        parse(["-d", "vm", "-o", "/tmp/x", "--push"])
    assert parse(["-d", "vm", "-o", "/tmp/x", "-t", "qcow2", "--push"]).push
