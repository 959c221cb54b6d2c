"""Helpers for the backup system tests: run virtnbdbackup, check points against shadows."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.lab.apply_chain import apply_chain
from tests.lab.libvirt_lab import ALIGN, LabDomain, Op, compare_images

REPO = Path(__file__).resolve().parents[2]
BACKUP = str(REPO / "virtnbdbackup")


@dataclass
class Result:
    rc: int
    summary: dict[str, Any] | None
    stderr: str


def backup_cmd(domain: LabDomain, level: str, folder: Path, *extra: str) -> list[str]:
    return [sys.executable, BACKUP, "-d", domain.name, "-l", level, "-o", str(folder), "-n", "--json",
            "--scratchdir", str(domain.dir), *extra]


def backup(domain: LabDomain, level: str, folder: Path, *extra: str) -> Result:
    proc = subprocess.run(backup_cmd(domain, level, folder, *extra), capture_output=True, text=True,
                          timeout=300, check=False)
    summary = json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else None
    return Result(proc.returncode, summary, proc.stderr)


def ok(domain: LabDomain, level: str, folder: Path, *extra: str) -> dict[str, Any]:
    res = backup(domain, level, folder, *extra)
    assert res.rc == 0, res.stderr
    assert res.summary is not None
    return res.summary


def check_point(domain: LabDomain, folder: Path, point: str, expected: dict[str, Path], work: Path) -> None:
    """Every disk of ``point`` rebuilt from the chain equals its expected image (qemu-img compare)."""
    for target, image in expected.items():
        out = work / f"applied-{target}-{point}.raw"
        apply_chain(folder, target, point, out)
        compare_images(out, image, fmt="raw")
        out.unlink()


def must_read_blocks(ops: list[Op], align: int = ALIGN) -> int:
    """Bytes an inc must read: blocks whose last op since the parent left data (not zero/discard)."""
    last: dict[int, str] = {}
    for op in ops:
        for block in range(op.offset // align, (op.end + align - 1) // align):
            last[block] = op.kind
    return sum(align for kind in last.values() if kind in ("data", "pattern"))


def job_running(domain: LabDomain) -> bool:
    import libvirt
    try:
        domain.dom.backupGetXMLDesc(0)
    except libvirt.libvirtError:
        return False
    return True


def leftovers(folder: Path, scratch: Path) -> list[str]:
    names = [p.name for p in folder.iterdir() if p.name.endswith(".partial") or p.name.startswith(".")
             and p.name.endswith(".tmp")]
    names += [p.name for p in scratch.glob("virtnbd.*.*")]
    return names


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}
