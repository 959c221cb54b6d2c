"""virtnbdmount on stream sets: every point and disk is a file equal to the disk at that point; a damaged
frame fails reads of that frame with EIO only; umount ends the command with 0."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.functional.test_pointreader import build_chain, damage_first_data_frame

ROOT = Path(__file__).resolve().parents[2]


def mount(folder: str, mnt: Path, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, str(ROOT / "virtnbdmount"), folder, str(mnt), *args],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not os.path.ismount(mnt):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return proc


def test_every_point_is_a_file_and_umount_ends_it(tmp_path):
    b = build_chain(tmp_path / "set", "zstd", incs=3)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = mount(b.folder, mnt)
    try:
        assert sorted(os.listdir(mnt)) == sorted(b.points)
        for point in b.points:
            assert os.listdir(mnt / point) == ["sda.raw"]
            assert (mnt / point / "sda.raw").read_bytes() == Path(b.shadow_path(point)).read_bytes()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert proc.wait(timeout=20) == 0


def test_a_damaged_frame_gives_eio_for_its_range_only(tmp_path):
    b = build_chain(tmp_path / "set", None, incs=1)
    stream = Path(b.folder) / "sda.full.data"
    ref = damage_first_data_frame(stream, 7, 0x80)
    want = Path(b.shadow_path(b.points[0])).read_bytes()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = mount(b.folder, mnt)
    try:
        fd = os.open(mnt / b.points[0] / "sda.raw", os.O_RDONLY | os.O_DIRECT)
        try:
            with pytest.raises(OSError) as err:
                os.pread(fd, 4096, ref.offset)
            assert err.value.errno == errno.EIO
            other = (ref.offset + ref.length + 4096 * 16) % (len(want) - 4096) // 4096 * 4096
            assert os.pread(fd, 4096, other) == want[other:other + 4096]
        finally:
            os.close(fd)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 128 + signal.SIGTERM
    assert "checksum mismatch" in proc.stderr.read()
    assert not os.path.ismount(mnt)
