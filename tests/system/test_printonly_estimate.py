"""-p on an inc estimates what the inc will read (the dirty bitmap), not the allocated size."""
from __future__ import annotations

import pytest

from tests.lab.libvirt_lab import DiskSpec, MiB
from tests.system.backup_helpers import ok

pytestmark = pytest.mark.system

KiB = 1024


def test_printonly_inc_estimate_is_the_dirty_size(make_domain) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", 8 * MiB)])
    folder = dom.dir / "backup"
    dom.disk("sda").write_data(0, 4 * MiB, seed=1)           # 4 MiB allocated
    ok(dom, "full", folder)
    dom.disk("sda").write_data(MiB, 128 * KiB, seed=2)       # 128 KiB changed
    estimate = ok(dom, "inc", folder, "-p")["estimate"]["sda"]
    read = ok(dom, "inc", folder)["disks"]["sda"]["bytes_read"]
    assert estimate == read == 128 * KiB
