"""virtnbdprune on synthetic roots (a current chain + an archived chain): decisions, removals, safety."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.functional.restore_sets import SetBuilder
from tests.functional.retention_helpers import restore_all_exact
from virtnbd.backupset import manifest
from virtnbd.backupset.store import LocalStore, folder_lock
from virtnbd.cli.prune import main as prune_main
from virtnbd.retention import verifylog


def _build(folder: str, month: int, days: int, seed: int, diff: bool = False) -> tuple[SetBuilder, dict[str, str]]:
    b = SetBuilder(folder, size=2 << 20, seed=seed)
    b.scribble(20)
    b.time = f"2026-{month:02d}-01T02:00:00+00:00"
    b.full()
    for day in range(2, days + 1):
        b.scribble(4)
        b.time = f"2026-{month:02d}-{day:02d}T02:00:00+00:00"
        b.inc()
    if diff:
        b.scribble(4)
        b.time = f"2026-{month:02d}-{days:02d}T12:00:00+00:00"
        b.diff()
    return b, {p: b.shadow_path(p) for p in b.points}


@pytest.fixture
def root(tmp_path: Path) -> tuple[Path, SetBuilder, dict[str, str]]:
    """root/: current chain Feb 1..10 + a diff on Feb 10; root/chain-20260201-000000: Jan 1..5."""
    base = tmp_path / "root"
    _build(str(base / "chain-20260201-000000"), 1, 5, seed=7)
    cur, shadows = _build(str(base), 2, 10, seed=8, diff=True)
    return base, cur, shadows


def _dry_run(base: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> dict[tuple[str, str], tuple[str, str]]:
    assert prune_main(["-i", str(base), *args, "--dry-run", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    return {(d["chain"], d["point"]): (d["action"], d["rule"]) for d in doc["points"]}


def test_dry_run_names_the_rule_for_every_point(root, capsys) -> None:
    base, cur, _ = root
    before = sorted(os.listdir(base))
    got = _dry_run(base, "--keep-daily", "3", capsys=capsys)
    diff = cur.points[-1]
    # daily 3 (newest first): the diff (Feb 10), virtnbdbackup.8 (Feb 9), virtnbdbackup.7 (Feb 8)
    assert got[("current", diff)] == ("keep", "daily 2026-02-10")
    assert got[("current", "virtnbdbackup.8")] == ("keep", "daily 2026-02-09")
    assert got[("current", "virtnbdbackup.7")] == ("keep", "daily 2026-02-08")
    assert got[("current", "virtnbdbackup.9")][0] == "keep"         # the diff's parent, newest of the chain
    assert got[("current", "virtnbdbackup.0")] == ("keep", f"needed by {diff}")   # the newest that needs it
    assert {a for (c, _), (a, _) in got.items() if c != "current"} == {"remove"}
    merged = _dry_run(base, "--keep-daily", "3", "--merge", capsys=capsys)
    assert merged[("current", "virtnbdbackup.6")] == ("merge", "merged into a synthetic full at virtnbdbackup.7")
    assert sorted(os.listdir(base)) == before                      # a dry run changes nothing


def test_prune_removes_unneeded_chains_and_merges(root, capsys) -> None:
    base, cur, shadows = root
    assert prune_main(["-i", str(base), "--keep-daily", "3", "--merge"]) == 0
    assert not (base / "chain-20260201-000000").exists()
    m = manifest.load(base)
    assert m is not None
    assert [p.name for p in m.points] == ["virtnbdbackup.7", "virtnbdbackup.8", "virtnbdbackup.9", cur.points[-1]]
    restore_all_exact(str(base), shadows)
    assert verifylog.load(LocalStore(base))[cur.points[-1]].ok
    capsys.readouterr()
    assert prune_main(["-i", str(base), "--status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["points"] == 4 and status["chains"][0]["chain"] == "current"
    assert status["stored_bytes"] == sum(d.stored_bytes for p in m.points for d in p.disks.values())


def test_prune_without_merge_keeps_needed_points_and_drops_diffs(root) -> None:
    base, cur, shadows = root
    assert prune_main(["-i", str(base), "--keep-last", "2"]) == 0  # keeps the diff and virtnbdbackup.9
    m = manifest.load(base)
    assert m is not None and len(m.points) == 11
    cur.scribble(3)
    cur.time = "2026-02-11T02:00:00+00:00"
    cur.diff()
    shadows[cur.points[-1]] = cur.shadow_path(cur.points[-1])
    assert prune_main(["-i", str(base), "--keep-last", "1"]) == 0  # the older diff goes
    m = manifest.load(base)
    assert m is not None and [p.level for p in m.points].count("diff") == 1
    assert not os.path.exists(os.path.join(base, f"sda.{cur.points[-2]}.data"))
    restore_all_exact(str(base), shadows)


def test_prune_refuses_while_a_backup_holds_the_lock(root) -> None:
    base, _, _ = root
    with folder_lock(base):
        assert prune_main(["-i", str(base), "--keep-last", "1"]) == 1
    assert (base / "chain-20260201-000000").exists()


def test_nothing_removed_when_the_newest_point_fails_verification(root) -> None:
    base, cur, _ = root
    m = manifest.load(base)
    assert m is not None
    newest = base / m.points[-1].disks["sda"].file
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert prune_main(["-i", str(base), "--keep-last", "1", "--merge"]) == 1
    assert (base / "chain-20260201-000000").exists()
    after = manifest.load(base)
    assert after is not None and after.points == m.points
    assert not verifylog.load(LocalStore(base))[m.points[-1].name].ok


def test_usage_errors() -> None:
    assert prune_main(["-i", "/nonexistent"]) == 1
    assert prune_main(["-i", "/nonexistent", "--keep-within", "1w"]) == 1
    assert prune_main(["-i", "/nonexistent", "--keep-last", "1", "--status"]) == 1
