"""Consolidation of a stream chain into a synthetic full: proof by bytes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.functional.restore_sets import SetBuilder
from tests.functional.retention_helpers import restore_all_exact, stored
from virtnbd import errors
from virtnbd.backupset import manifest
from virtnbd.retention.consolidate import consolidate


def _chain(tmp_path: Path, incs: int, compression: str | None = None) -> SetBuilder:
    b = SetBuilder(str(tmp_path / "set"), size=4 << 20, compression=compression)
    b.scribble(40)
    b.full()
    for _ in range(incs):
        b.scribble(8)
        b.inc()
    return b


@pytest.mark.parametrize("compression", [None, "lz4"])
def test_consolidated_chain_restores_every_point_and_continues(tmp_path: Path, compression: str | None) -> None:
    b = _chain(tmp_path, 8, compression)
    shadows = {p: b.shadow_path(p) for p in b.points}
    before = stored(b.folder)
    result = consolidate(Path(b.folder), "virtnbdbackup.5")
    assert result.merged == tuple(f"virtnbdbackup.{i}" for i in range(6))
    listed = restore_all_exact(b.folder, shadows)
    assert listed == [f"virtnbdbackup.{i}" for i in range(5, 9)]
    assert stored(b.folder) < before
    assert result.stored_after < result.stored_before
    m = manifest.load(b.folder)
    assert m is not None and m.points[0].level == "full" and m.points[0].checkpoint == "virtnbdbackup.5"
    assert not [f for f in os.listdir(b.folder) if f.startswith("sda.inc.virtnbdbackup.") and
                int(f.split(".")[3]) <= 5]
    assert not os.path.exists(os.path.join(b.folder, "sda.full.data"))
    b.scribble(5)
    b.inc()                                         # the next inc continues the chain
    shadows[b.points[-1]] = b.shadow_path(b.points[-1])
    restore_all_exact(b.folder, shadows)
    consolidate(Path(b.folder), "virtnbdbackup.8")   # a second consolidation over a synthetic full
    restore_all_exact(b.folder, shadows)


def test_a_diff_that_needs_a_merged_point_blocks_consolidation(tmp_path: Path) -> None:
    b = _chain(tmp_path, 3)
    b.scribble(3)
    b.diff()
    b.scribble(3)
    b.inc()
    with pytest.raises(errors.ChainError, match="depend on points being merged"):
        consolidate(Path(b.folder), "virtnbdbackup.4")
    m = manifest.load(b.folder)
    assert m is not None and len(m.points) == 6


def test_a_damaged_merged_point_stops_consolidation_and_changes_nothing(tmp_path: Path) -> None:
    b = _chain(tmp_path, 4)
    path = Path(b.folder) / "sda.inc.virtnbdbackup.2.data"
    m = manifest.load(b.folder)
    assert m is not None
    with open(path, "r+b") as f:                     # flip a byte inside the first data frame's payload
        f.seek(path.stat().st_size // 3)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(errors.VirtnbdError):
        consolidate(Path(b.folder), "virtnbdbackup.3")
    after = manifest.load(b.folder)
    assert after is not None and after.points == m.points
    left = os.listdir(b.folder)
    assert not [f for f in left if "journal" in f or f.endswith(".partial") or ".full.virtnbdbackup" in f], left
