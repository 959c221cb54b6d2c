"""Shared checks for consolidation/prune tests: every listed point restores exact, verify passes."""
from __future__ import annotations

import os
import tempfile

from tests.functional.restore_sets import compare
from virtnbd.backupset import manifest
from virtnbd.cli.restore import main as restore_main


def restore_all_exact(folder: str, shadows: dict[str, str], *key: str) -> list[str]:
    """Restore every point the manifest lists to raw and compare with its shadow image (``key``: the
    key options of an encrypted set)."""
    m = manifest.load(folder)
    assert m is not None
    with tempfile.TemporaryDirectory(prefix="vnbd-ret-") as out:
        for p in m.points:
            target = os.path.join(out, p.name)
            assert restore_main(["-i", folder, "-o", target, "--until", p.name, "--format", "raw", "-n", *key]) == 0
            compare(os.path.join(target, "sda.raw"), "raw", shadows[p.name])
    assert restore_main(["-i", folder, "-a", "verify", "-n", *key]) == 0
    return [p.name for p in m.points]


def stored(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".data"))
