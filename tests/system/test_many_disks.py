"""A 16-disk domain backed up and restored with -w 4: byte-exact, peak RSS <= 128 MiB on both sides."""
from __future__ import annotations

import os

import pytest

from tests.functional.restore_sets import compare
from tests.lab import scale_sets
from tests.lab.libvirt_lab import DiskSpec, MiB

pytestmark = pytest.mark.system

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 4 * MiB
LIMIT_KIB = 128 << 10


def test_sixteen_disks_backup_and_restore_w4(make_domain, tmp_path) -> None:  # type: ignore[no-untyped-def]
    specs = [DiskSpec(f"sd{chr(ord('a') + i)}", "scsi", "qcow2", SIZE) for i in range(16)]
    dom = make_domain(disks=specs)
    for i, spec in enumerate(specs):
        dom.disk(spec.target).write_data((i * 192 << 10) % (3 * MiB), 512 << 10, seed=i + 1)
    expected = {spec.target: dom.disk(spec.target).snapshot("p0") for spec in specs}
    folder = tmp_path / "backup"
    res = scale_sets.run_cli("virtnbd.cli.backup", ["-d", dom.name, "-l", "full", "-o", str(folder), "-n",
                                                   "--scratchdir", str(dom.dir), "-w", "4"], cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert 0 < res.peak_kib <= LIMIT_KIB, res.peak_kib
    out = tmp_path / "out"
    rest = scale_sets.run_restore(["-i", str(folder), "-o", str(out), "-w", "4"], cwd=ROOT)
    assert rest.returncode == 0, rest.stderr
    assert 0 < rest.peak_kib <= LIMIT_KIB, rest.peak_kib
    print(f"16 disks -w 4: peak RSS backup {res.peak_kib >> 10} MiB, restore {rest.peak_kib >> 10} MiB")
    for target, image in expected.items():
        compare(str(out / f"{target}.qcow2"), "qcow2", str(image))
