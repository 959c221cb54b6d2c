"""Helpers for the chain-robustness system tests (issue 6): manifest, checkpoints, restore."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.lab.libvirt_lab import LabDomain, compare_images, random_writes
from tests.system.backup_helpers import REPO, backup

Expected = dict[str, dict[str, Path]]


def write_all(domain: LabDomain, seed: int, n: int, kinds: tuple[str, ...]) -> None:
    """``n`` deterministic random ops on every disk (a different seed per disk)."""
    for i, disk in enumerate(domain.disks.values()):
        disk.apply_all(random_writes(seed=seed * 10 + i, n=n, size=disk.size, kinds=kinds))


def snap_all(domain: LabDomain, name: str) -> dict[str, Path]:
    """The expected image of every disk now (copies of the shadows)."""
    return {t: d.snapshot(name) for t, d in domain.disks.items()}


def points(folder: Path) -> list[str]:
    path = folder / "virtnbd.manifest.json"
    if not path.exists():
        return []
    return [p["name"] for p in json.loads(path.read_text())["points"]]


def manifest_points(folder: Path) -> list[dict[str, Any]]:
    return list(json.loads((folder / "virtnbd.manifest.json").read_text())["points"])


def checkpoint_names(domain: LabDomain) -> list[str]:
    return sorted(c.getName() for c in domain.dom.listAllCheckpoints())


def fails(domain: LabDomain, level: str, folder: Path, *extra: str) -> str:
    """Run a backup that must fail; returns its stderr (one error line checked by the caller)."""
    res = backup(domain, level, folder, *extra)
    assert res.rc != 0, f"backup -l {level} unexpectedly succeeded"
    assert "Traceback" not in res.stderr, res.stderr
    return res.stderr


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, stderr
    return lines[0]


def restore(folder: Path, point: str, out_dir: Path) -> dict[str, Path]:
    """``virtnbdrestore --format raw`` of a point; the restored image of each disk."""
    cmd = [sys.executable, str(REPO / "virtnbdrestore"), "-n", "-i", str(folder), "-o", str(out_dir), "-a",
           "restore", "--until", point, "--format", "raw"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    found: dict[str, Path] = {}
    for path in sorted(out_dir.iterdir()):
        target = path.name.split(".")[0]
        found.setdefault(target, path)
    return found


def check_restored(folder: Path, point: str, expected: dict[str, Path], work: Path) -> None:
    """virtnbdrestore gives every disk of ``point`` byte-exact and at the expected size."""
    out = work / f"restore-{point}"
    images = restore(folder, point, out)
    assert sorted(images) == sorted(expected), (sorted(images), sorted(expected))
    for target, image in expected.items():
        compare_images(images[target], image, fmt="raw")
