"""Backup folders in virtnbdbackup's documented format (uncompressed and lz4, full + incs + diff,
two disks) restore byte-exact at every point, and dump/verify work on them."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from tests.functional.restore_sets import compare
from tests.lab.legacy_writer import LegacyPoint, write_set
from virtnbd.cli.restore import main

SIZE = 4 << 20
UUID = "7d3b5f2e-1111-4222-8333-944455556666"


BLOCK = 64 << 10


def _build(folder: Path, compress: bool) -> tuple[dict[str, dict[str, bytes]], list[str]]:
    """Write the set like a dirty bitmap would drive it; return the expected images per point.

    An inc holds the blocks changed since the previous checkpoint, a diff the same without
    creating a checkpoint, so the inc after a diff carries the diff's changes too.
    """
    rng = random.Random(11 + compress)
    images = {"sda": bytearray(SIZE), "sdb": bytearray(SIZE)}
    allocated: dict[str, set[int]] = {d: set() for d in images}
    dirty: dict[str, set[int]] = {d: set() for d in images}
    points, expected, names = [], {}, []
    n = 0
    for level, ident in [("full", ""), ("inc", ""), ("inc", ""), ("diff", "1700000100"), ("inc", "")]:
        extents = {}
        for disk, img in images.items():
            for b in rng.sample(range(SIZE // BLOCK), 12 if level == "full" else 5):
                zero = level != "full" and rng.random() < 0.25
                img[b * BLOCK:(b + 1) * BLOCK] = bytes(BLOCK) if zero else rng.randbytes(BLOCK)
                allocated[disk].add(b)
                dirty[disk].add(b)
            blocks = sorted(allocated[disk] if level == "full" else dirty[disk])
            extents[disk] = [("data", b * BLOCK, bytes(img[b * BLOCK:(b + 1) * BLOCK]))
                             if any(img[b * BLOCK:(b + 1) * BLOCK]) else ("zero", b * BLOCK, BLOCK) for b in blocks]
            if level != "diff":
                dirty[disk].clear()
        points.append(LegacyPoint(level, extents, ident=ident, compress=compress))
        names.append(f"diff.{ident}" if level == "diff" else f"virtnbdbackup.{n}")
        n += level != "diff"
        expected[names[-1]] = {d: bytes(img) for d, img in images.items()}
    write_set(folder, "vm1", UUID, points, virtual_size=SIZE)
    return expected, names


@pytest.fixture(params=[False, True], ids=["uncompressed", "lz4"])
def legacy_set(request, tmp_path):
    folder = tmp_path / "legacy"
    expected, names = _build(folder, request.param)
    return folder, expected, names, tmp_path


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_legacy_set_restores_every_point_byte_exact(legacy_set, fmt):
    folder, expected, names, tmp = legacy_set
    for point in names:
        out = tmp / f"out-{fmt}-{point}"
        assert main(["-i", str(folder), "-o", str(out), "-n", "--until", point, "--format", fmt]) == 0
        for disk, want in expected[point].items():
            ref = tmp / f"want-{point}-{disk}.raw"
            ref.write_bytes(want)
            compare(str(out / f"{disk}.{fmt}"), fmt, str(ref))


def test_legacy_set_dump_and_verify(legacy_set, capsys):
    folder, _, names, _ = legacy_set
    assert main(["-i", str(folder), "-a", "dump", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["domain"] == "vm1" and doc["domain_uuid"] == UUID
    assert sorted(p["name"] for p in doc["points"]) == sorted(names)
    assert main(["-i", str(folder), "-a", "verify"]) == 0
    assert "10 file(s) ok" in capsys.readouterr().err


def test_legacy_set_damage_is_named(legacy_set, capsys):
    folder, expected, names, tmp = legacy_set
    victim = folder / "sda.inc.virtnbdbackup.1.data"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))
    out = tmp / "out-bad"
    assert main(["-i", str(folder), "-o", str(out), "-n"]) == 1
    assert main(["-i", str(folder), "-a", "verify"]) == 1
    err = capsys.readouterr().err
    assert "sda.inc.virtnbdbackup.1.data" in err.strip().splitlines()[-1]
    # disks restore in parallel: the damaged disk leaves nothing, another one only a complete, exact image
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not [n for n in left if n.startswith("sda.") or n.endswith(".partial")], left
    for name in left:
        ref = tmp / f"want-{name}.raw"
        ref.write_bytes(expected[names[-1]][name.split(".")[0]])
        compare(str(out / name), "qcow2", str(ref))
    assert os.path.exists(victim)
