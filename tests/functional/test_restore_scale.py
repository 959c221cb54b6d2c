"""Restore memory does not grow with frames or points; parallel multi-disk restore stops cleanly on damage.

The chains are written with the project's StreamWriter (tests/lab/scale_sets.py)
and restored by the real command in a child process that reports its own peak RSS
(VmHWM). The planner's entry budget is set deliberately small (64 entries) in
the child, so a chain of 60 000 frames is planned in about a thousand windows.
"""
from __future__ import annotations

import os

import pytest

from tests.functional.restore_sets import compare
from tests.lab import scale_sets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _restore(args: list[str], budget: int = 64) -> tuple[int, int, str]:
    """Run virtnbdrestore in a child; return (exit code, peak RSS in KiB, stderr)."""
    res = scale_sets.run_restore(args, budget, cwd=ROOT)
    return res.returncode, res.peak_kib, res.stderr


def test_restore_memory_does_not_grow_with_frames(tmp_path):
    tiny = scale_sets.build(str(tmp_path / "tiny"), size=16 << 20, points=2, changes=50, block=512)
    big = scale_sets.build(str(tmp_path / "big"), size=16 << 20, points=12, changes=5000, block=512, seed=7)
    assert big.frames == 60000
    rc, rss_tiny, err = _restore(["-i", tiny.folder, "-o", str(tmp_path / "o1"), "--format", "raw", "-w", "2"])
    assert rc == 0, err
    rc, rss_big, err = _restore(["-i", big.folder, "-o", str(tmp_path / "o2"), "--format", "raw", "-w", "2"])
    assert rc == 0, err
    compare(str(tmp_path / "o2" / "vda.raw"), "raw", big.expected["vda"])
    # A plan holding one record per frame (the former design) needed > 25 MiB more here.
    assert rss_big - rss_tiny < 8 << 10, (rss_tiny, rss_big)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_multi_disk_restore_with_one_damaged_file(tmp_path, fmt):
    """Four disks in parallel, one stream damaged in its data: the error names that file and no image
    is left under a final name unless complete and exact."""
    s = scale_sets.build(str(tmp_path / "set"), size=8 << 20, points=3, changes=400, block=4096, disks=4)
    victim = os.path.join(s.folder, "vdc.inc.virtnbdbackup.1.data")
    with open(victim, "r+b") as f:                   # one bit of a frame payload in the middle of the file
        f.seek(os.path.getsize(victim) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    out = tmp_path / "out"
    rc, _, err = _restore(["-i", s.folder, "-o", str(out), "--format", fmt, "-w", "4"], budget=256)
    assert rc != 0
    assert "vdc.inc.virtnbdbackup.1.data" in err.strip().splitlines()[-1], err
    left = sorted(os.listdir(out))
    assert f"vdc.{fmt}" not in left
    assert not [n for n in left if n.endswith(".partial")], left
    for name in left:
        disk = name.split(".")[0]
        compare(str(out / name), fmt, s.expected[disk])


def test_parallel_multi_disk_restore_exact(tmp_path):
    s = scale_sets.build(str(tmp_path / "set"), size=8 << 20, points=4, changes=300, block=4096, disks=6)
    rc, _, err = _restore(["-i", s.folder, "-o", str(tmp_path / "out"), "--format", "raw", "-w", "3"], budget=128)
    assert rc == 0, err
    for d in s.disks:
        compare(str(tmp_path / "out" / f"{d}.raw"), "raw", s.expected[d])
