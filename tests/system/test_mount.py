"""virtnbdmount: a real backup of a disk with a GPT partition table and an ext4 holding known files; the
point's partition mounts read-only through the FUSE file and gives the files byte-exact as they were at
the point (the disk changed after it)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lab.libvirt_lab import DiskSpec, MiB
from tests.system.backup_helpers import ok

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[2]
SIZE = 32 * MiB
PART_START = 2048 * 512


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def write_disk(image: Path, work: Path, files: dict[str, bytes]) -> None:
    """A GPT disk whose first partition holds an ext4 with ``files``, written over the domain's raw image."""
    seed = work / "seed"
    seed.mkdir(exist_ok=True)
    for name, data in files.items():
        (seed / name).write_bytes(data)
    disk, part = work / "disk.raw", work / "part.raw"
    disk.unlink(missing_ok=True)
    part.unlink(missing_ok=True)
    with open(disk, "wb") as f:
        f.truncate(SIZE)
    run("sgdisk", "-o", "-n", "1:2048:0", str(disk))
    part_size = int(run("partx", "-g", "-n", "1", "-o", "SECTORS", str(disk))) * 512
    run("mkfs.ext4", "-q", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", str(seed),
        str(part), str(part_size // 1024) + "k")
    run("dd", f"if={part}", f"of={disk}", "bs=1M", f"seek={PART_START}", "oflag=seek_bytes", "conv=notrunc,sparse",
        "status=none")
    run("dd", f"if={disk}", f"of={image}", "bs=1M", "conv=notrunc", "status=none")


def wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def read_partition_files(raw: Path, fsmnt: Path, names: list[str]) -> dict[str, bytes]:
    """losetup + partx -a (this kernel has no partition parsers), mount ro,noload, read, undo."""
    loop = run("losetup", "-f", "--show", "-r", str(raw))
    try:
        run("partx", "-a", loop)
        run("mount", "-o", "ro,noload", f"{loop}p1", str(fsmnt))
        try:
            return {n: (fsmnt / n).read_bytes() for n in names if (fsmnt / n).exists()}
        finally:
            run("umount", str(fsmnt))
            run("partx", "-d", loop)
    finally:
        run("losetup", "-d", loop)


def test_mount_a_point_and_read_a_file_byte_exact(make_domain, tmp_path):
    dom = make_domain(disks=[DiskSpec("sda", "sata", "raw", SIZE)], start=False)
    image = dom.disk("sda").image
    v1 = {"hello.txt": b"hello from point 0\n", "blob.bin": os.urandom(3 * MiB + 123)}
    write_disk(image, tmp_path, v1)
    folder = dom.dir / "backup"
    p0 = ok(dom, "full", folder)["point"]
    v2 = {"hello.txt": b"changed after point 0\n", "blob.bin": v1["blob.bin"], "new.txt": b"only in point 1\n"}
    write_disk(image, tmp_path, v2)           # after the backup: the mount must still show point p0

    mnt, fsmnt = tmp_path / "mnt", tmp_path / "fsmnt"
    mnt.mkdir()
    fsmnt.mkdir()
    proc = subprocess.Popen([sys.executable, str(ROOT / "virtnbdmount"), str(folder), str(mnt)],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for(mnt / p0 / "sda.raw", proc)
        assert os.listdir(mnt) == [p0]
        assert (mnt / p0 / "sda.raw").stat().st_size == SIZE
        with pytest.raises(OSError):
            (mnt / p0 / "sda.raw").open("r+b")
        got0 = read_partition_files(mnt / p0 / "sda.raw", fsmnt, ["hello.txt", "blob.bin", "new.txt"])
        assert got0 == v1
        assert read_partition_files(image, fsmnt, ["hello.txt", "new.txt"])["new.txt"] == v2["new.txt"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
    assert code == 128 + signal.SIGTERM
    assert not os.path.ismount(mnt)
