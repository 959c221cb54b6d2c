"""virtnbdbackup -l auto --renew N --keep-last N on a real domain: the chain is renewed after N incs
(the old one archived and restorable), and the policy runs after each committed backup until the
archived chain holds nothing a kept point needs, then it goes as a whole."""
from __future__ import annotations

import pytest

from tests.lab.libvirt_lab import DiskSpec, MiB, random_writes
from tests.system.backup_helpers import ok
from tests.system.chain_helpers import check_restored, points

pytestmark = pytest.mark.system

SIZE = 8 * MiB


def test_renew_and_keep_after_backup(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    disk = dom.disk("sda")
    folder = dom.dir / "backup"
    levels, archives = [], []
    previous = disk.snapshot("start")
    for run in range(6):
        disk.apply_all(random_writes(seed=50 + run, n=4, size=SIZE))
        summary = ok(dom, "auto", folder, "--renew", "2", "--keep-last", "3")
        levels.append(summary["level"])
        archives.append(sorted(p.name for p in folder.glob("chain-*")))
        if run == 3:
            old = folder / archives[3][0]
            assert points(old) == ["virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2"]
            check_restored(old, "virtnbdbackup.2", {"sda": previous}, tmp_path / "archived")
        previous = disk.snapshot(f"p{run}")
    assert levels == ["full", "inc", "inc", "full", "inc", "inc"]
    # runs 4 and 5: the archive's newest points are among the 3 newest, so it stays; run 6: it goes
    assert [len(a) for a in archives] == [0, 0, 0, 1, 1, 0]
    assert points(folder) == ["virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2"]
    check_restored(folder, "virtnbdbackup.2", {"sda": previous}, tmp_path / "current")
    assert list(folder.glob("prune.*.log"))
