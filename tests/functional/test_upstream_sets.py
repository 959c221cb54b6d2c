"""Backup sets written by abbbi/virtnbdbackup 2.47 itself (tests/data/upstream-sets, see its README):
every point of the plain and the lz4 set restores to the sha256 recorded with the set, and dump and
verify read them. These sets were not written by our writer of the format, so a shared misreading of
the format by our reader and our writer cannot hide here."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from virtnbd.cli.restore import main

SETS = Path(__file__).resolve().parents[1] / "data" / "upstream-sets"
KINDS = ("plain", "lz4")
POINTS = ("virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2")


def expected(kind: str) -> dict[str, str]:
    """point name -> sha256 of the raw disk at that point (lines ``pN <sha256>``)."""
    lines = (SETS / f"{kind}.expected").read_text().split("\n")
    pairs = [line.split() for line in lines if line.strip()]
    return {f"virtnbdbackup.{name[1:]}": digest for name, digest in pairs}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def test_the_sets_are_complete() -> None:
    for kind in KINDS:
        assert sorted(expected(kind)) == list(POINTS)
        names = {p.name for p in (SETS / kind).iterdir()}
        assert {"sda.full.data", "sda.inc.virtnbdbackup.1.data", "sda.inc.virtnbdbackup.2.data",
                "upstream-vm.cpt", "checkpoints"} <= names


@pytest.mark.parametrize("kind", KINDS)
def test_every_point_restores_to_its_sha256(kind: str, tmp_path: Path) -> None:
    for point, digest in expected(kind).items():
        out = tmp_path / point
        assert main(["-i", str(SETS / kind), "-o", str(out), "-n", "--until", point, "--format", "raw"]) == 0
        assert sha256(out / "sda.raw") == digest, f"{kind} {point}"


@pytest.mark.parametrize("kind", KINDS)
def test_last_point_as_qcow2(kind: str, tmp_path: Path) -> None:
    out = tmp_path / "q"
    assert main(["-i", str(SETS / kind), "-o", str(out), "-n", "--format", "qcow2"]) == 0
    raw = tmp_path / "q.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(out / "sda.qcow2"), str(raw)], check=True)
    assert sha256(raw) == expected(kind)[POINTS[-1]]


@pytest.mark.parametrize("kind", KINDS)
def test_dump_and_verify(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-i", str(SETS / kind), "-a", "dump", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["domain"] == "upstream-vm"
    points = doc["points"]
    assert [p["name"] for p in points] == list(POINTS)
    assert [p["level"] for p in points] == ["full", "inc", "inc"]
    assert [p["parent"] for p in points] == [None, *POINTS[:-1]]
    for p in points:
        assert p["disks"]["sda"]["virtual_size"] == 32 << 20
        assert bool(p["disks"]["sda"]["extra"]["legacy_meta"]["compressed"]) == (kind == "lz4")
    assert main(["-i", str(SETS / kind), "-a", "verify"]) == 0
    assert "3 file(s) ok" in capsys.readouterr().err


def test_damaged_upstream_set_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "lz4"
    shutil.copytree(SETS / "lz4", folder)
    victim = folder / "sda.inc.virtnbdbackup.1.data"
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))
    assert main(["-i", str(folder), "-a", "verify"]) == 1
    assert victim.name in capsys.readouterr().err.strip().splitlines()[-1]
