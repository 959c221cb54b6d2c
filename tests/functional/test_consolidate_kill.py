"""SIGKILL at 20 moments of a consolidation: every listed point restores exact, verify passes,
and a second run finishes the job.

Moments: strace kills the run at the N-th fsync (journal, new stream, manifest temp file, folder
syncs after the manifest swap and the deletions), the N-th rename (verify record, journal, new
stream, the manifest swap itself) and the N-th unlink (the removals of merged files, the journal).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from tests.functional.restore_sets import small_lz4_chain
from tests.functional.retention_helpers import restore_all_exact
from tests.lab.fault_lab import CrashRunner
from virtnbd.backupset import manifest

MOMENTS = ([("fsync", n) for n in range(1, 11)] + [("rename", n) for n in range(1, 5)]
           + [("unlink", n) for n in (1, 2, 3, 5, 7, 9)])
ROOT = str(Path(__file__).resolve().parents[2])


def _killed_at(syscall: str, n: int, cmd: list[str]) -> list[str]:
    return ["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
            "-e", f"inject={syscall}:signal=SIGKILL:when={n}", "--", *cmd]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    return small_lz4_chain(str(tmp_path_factory.mktemp("kill") / "set"), 6)


@pytest.mark.parametrize(("syscall", "n"), MOMENTS, ids=[f"{s}{n}" for s, n in MOMENTS])
def test_kill_during_consolidation(pristine, crash_runner: CrashRunner, tmp_path: Path, syscall: str,
                                   n: int) -> None:
    if shutil.which("strace") is None:
        pytest.fail("strace is missing (scripts/setup installs it)")
    source, shadows = pristine
    folder = str(tmp_path / "set")
    shutil.copytree(source, folder)
    cmd = [sys.executable, "-m", "virtnbd.cli.prune", "-i", folder, "--consolidate", "virtnbdbackup.3"]
    runner = CrashRunner(cwd=Path(ROOT))
    try:
        out = runner.run(_killed_at(syscall, n, cmd))
    finally:
        runner.close()
    assert out.returncode in (-9, 137), f"not killed at {syscall} #{n}: {out.returncode} {out.stderr[-400:]}"
    restore_all_exact(folder, shadows)                 # whatever the manifest lists is exact
    again = crash_runner.run(cmd)
    assert again.returncode == 0, again.stderr
    listed = restore_all_exact(folder, shadows)
    assert listed == [f"virtnbdbackup.{i}" for i in range(3, 7)]
    left = sorted(os.listdir(folder))
    assert not [f for f in left if f.endswith((".partial", ".tmp", ".journal"))], left
    m = manifest.load(folder)
    assert m is not None
    data = sorted(f for f in left if f.endswith(".data"))
    assert data == sorted(d.file for p in m.points for d in p.disks.values())
