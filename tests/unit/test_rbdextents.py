"""RBD change tracking: pure parts (ranges -> block-status runs, which disks, plan decisions)."""
from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from virtnbd import rbdconn
from virtnbd.backup.options import BackupOptions
from virtnbd.backup.plan import make_plan
from virtnbd.backupset import manifest
from virtnbd.source import rbdextents
from virtnbd.source.extents import BASE_ALLOCATION, DATA, ZERO, Extent, iter_extents
from virtnbd.virt.domainxml import Disk

RBD_RAW = Disk("sda", "virtio", "raw", "network", None, protocol="rbd", name="rbd/vm1")
RBD_QCOW2 = Disk("sdb", "virtio", "qcow2", "network", None, protocol="rbd", name="rbd/vm1-b")
FILE_RAW = Disk("sdc", "sata", "raw", "file", "/x.raw")


def test_which_disks_are_tracked() -> None:
    assert rbdextents.tracked(RBD_RAW)
    assert rbdextents.image_of(RBD_RAW) == rbdconn.ImageSpec("rbd", "vm1")
    assert not rbdextents.tracked(RBD_QCOW2)           # qcow2 carries a QEMU bitmap
    assert not rbdextents.tracked(FILE_RAW)
    snap = Disk("sda", "virtio", "raw", "network", None, protocol="rbd", name="rbd/vm1@s1")
    assert not rbdextents.tracked(snap)
    nbd = Disk("sda", "virtio", "raw", "network", None, protocol="nbd", name="exp")
    assert not rbdextents.tracked(nbd)


def test_merge() -> None:
    assert rbdextents.merge([(10, 5), (0, 4), (4, 2), (20, 0), (12, 10)]) == [(0, 6), (10, 12)]


def test_dirty_runs_cover_the_query_exactly() -> None:
    changed = [(100, 50), (300, 10)]
    assert rbdextents.dirty_runs(changed, 0, 400) == [(100, 0), (50, 1), (150, 0), (10, 1), (90, 0)]
    assert rbdextents.dirty_runs(changed, 120, 10) == [(10, 1)]
    assert rbdextents.dirty_runs(changed, 150, 150) == [(150, 0)]
    assert rbdextents.dirty_runs([], 0, 8) == [(8, 0)]


@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 100)), max_size=12),
       st.integers(0, 1100), st.integers(1, 500))
def test_dirty_runs_property(ranges: list[tuple[int, int]], offset: int, count: int) -> None:
    changed = rbdextents.merge(ranges)
    runs = rbdextents.dirty_runs(changed, offset, count)
    assert sum(length for length, _ in runs) == count and all(length > 0 for length, _ in runs)
    pos = offset
    for length, flags in runs:
        for b in (pos, pos + length - 1):
            inside = any(o <= b < o + n for o, n in changed)
            assert inside == bool(flags)
        pos += length


def test_engine_reads_changed_data_and_records_changed_zeroes() -> None:
    size = 1 << 20

    def base(offset: int, count: int) -> dict[str, list[tuple[int, int]]]:
        # data in the first half, zero in the second
        half = size // 2
        runs = []
        if offset < half:
            runs.append((min(half, offset + count) - offset, 0))
        if offset + count > half:
            start = max(offset, half)
            runs.append((offset + count - start, 3))
        return {BASE_ALLOCATION: runs}

    status = rbdextents.with_dirty_context(base, [(4096, 8192), (size // 2 - 4096, 8192)])
    got = list(iter_extents(status, size, rbdextents.DIRTY_CONTEXT))
    assert got == [Extent(4096, 8192, DATA), Extent(size // 2 - 4096, 4096, DATA), Extent(size // 2, 4096, ZERO)]


def _point(name: str, level: str, parent: str | None, disks: tuple[str, ...]) -> manifest.Point:
    entries = {d: manifest.DiskEntry(disk=d, file=f"{d}.{name}.data", disk_format="raw", virtual_size=1,
                                     level=level, stored_bytes=0, data_bytes=0, zero_bytes=0, digest="",
                                     file_digest="", extra={}) for d in disks}
    return manifest.Point(name=name, level=level, parent=parent, checkpoint=name, time="t", disks=entries,
                          domain_xml="", checkpoint_xml=None, consistency="crash", extra={})


def test_plan_full_keeps_checkpoint_for_raw_rbd_only_domain() -> None:
    plan = make_plan(BackupOptions(domain="d", level="full", output="/o"), None, [RBD_RAW], 0)
    assert plan.checkpoint == "virtnbdbackup.0" and plan.point == "virtnbdbackup.0"
    assert plan.bitmap_disks == ()                      # no libvirt bitmap: the RBD snapshot tracks it
    plain = make_plan(BackupOptions(domain="d", level="full", output="/o"), None, [FILE_RAW], 0)
    assert plain.point == "virtnbdbackup.0" and plain.bitmap_disks == ()   # a chain, no libvirt checkpoint


def test_plan_inc_reads_raw_rbd_by_diff() -> None:
    m = manifest.Manifest(domain="d", domain_uuid="u",
                          points=(_point("virtnbdbackup.0", "full", None, ("sda", "sdc")),))
    plan = make_plan(BackupOptions(domain="d", level="inc", output="/o"), m, [RBD_RAW, FILE_RAW], 0,
                     domain="d", uuid="u")
    modes = {pd.target: (pd.mode, pd.reason) for pd in plan.disks}
    assert modes["sda"] == (rbdextents.MODE, "")
    assert modes["sdc"][0] == "full" and "no dirty bitmap" in modes["sdc"][1]
    assert plan.checkpoint == "virtnbdbackup.1" and plan.parent == "virtnbdbackup.0"


def test_mon_host_from_libvirt_hosts() -> None:
    assert rbdextents._mon_host([("10.0.0.1", "6789"), ("10.0.0.2", "3300"), ("mon3", None)]) == \
        "v1:10.0.0.1:6789,v2:10.0.0.2:3300,mon3"


def test_no_libvirt_fallback_with_an_explicit_config() -> None:
    opts = rbdconn.CephOptions(conf="/nonexistent/ceph.conf")
    assert rbdextents.from_libvirt(opts, object(), None) is opts       # explicit config: never guessed
