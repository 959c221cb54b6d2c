"""The lab itself, end to end against real libvirtd + QEMU: a domain, qemu-io
writes through the monitor, a real pull-mode backup job with a checkpoint read
over NBD (full, then incremental via the dirty bitmap), checked by bytes
against the shadow images."""
from __future__ import annotations

import pytest

from tests.lab.libvirt_lab import (
    ALIGN,
    JOB_SAFE_KINDS,
    OWNER_PREFIX,
    DiskSpec,
    ImageMismatch,
    LabDomain,
    LabError,
    MiB,
    assert_bytes_equal,
    compare_images,
    data_op,
    discard_op,
    pattern_op,
    random_writes,
    ranges_cover,
    ranges_of,
    sweep_orphans,
    zero_op,
)
from tests.lab.nbd_lab import flagged_ranges, nbd_connect, read_all

pytestmark = pytest.mark.system

SIZE = 16 * MiB


def backup_xml(domain: LabDomain, disks: list[str], incremental: str | None = None) -> str:
    inc = f"<incremental>{incremental}</incremental>" if incremental else ""
    items = "".join(
        f"<disk name='{d}' backup='yes' type='file'><scratch file='{domain.dir / f'scratch-{d}.qcow2'}'/></disk>"
        for d in disks
    )
    return (
        f"<domainbackup mode='pull'>{inc}"
        f"<server transport='unix' socket='{domain.socket_path()}'/>"
        f"<disks>{items}</disks></domainbackup>"
    )


def checkpoint_xml(name: str, disks: list[str]) -> str:
    items = "".join(f"<disk name='{d}' checkpoint='bitmap'/>" for d in disks)
    return f"<domaincheckpoint><name>{name}</name><disks>{items}</disks></domaincheckpoint>"


def test_shadow_tracks_live_disks(make_domain) -> None:  # type: ignore[no-untyped-def]
    """Every bus and format: monitor qemu-io ops land exactly like on the shadow."""
    dom = make_domain(
        disks=[DiskSpec("sda", "sata", "qcow2", SIZE), DiskSpec("vda", "virtio", "raw", SIZE),
               DiskSpec("sdb", "scsi", "qcow2", SIZE)],
    )
    for n, disk in enumerate(dom.disks.values()):
        disk.apply_all(random_writes(seed=100 + n, n=10, size=SIZE))
        disk.apply_all([data_op(0, ALIGN, 7), pattern_op(ALIGN, ALIGN, 0x5A), zero_op(0, ALIGN // 2),
                        discard_op(2 * ALIGN, ALIGN)])
        disk.check_image()
    # the check can fail: a write only on the domain side is seen
    sda = dom.disk("sda")
    dom.monitor_qemu_io(sda.qdev(), pattern_op(3 * MiB, ALIGN, 0x11), f"write -P 0x11 {3 * MiB} {ALIGN}")
    with pytest.raises(ImageMismatch, match="0x300000"):
        sda.check_image()


def test_pull_backup_full_then_incremental(make_domain) -> None:  # type: ignore[no-untyped-def]
    import libvirt

    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    sda = dom.disk("sda")
    sda.apply_all(random_writes(seed=1, n=12, size=SIZE))

    # full backup + checkpoint cp1
    dom.dom.backupBegin(backup_xml(dom, ["sda"]), checkpoint_xml("cp1", ["sda"]))
    expect1 = sda.snapshot("cp1")
    # writes after the backup point must not show in the export
    sda.apply_all(random_writes(seed=2, n=6, size=SIZE, kinds=JOB_SAFE_KINDS))
    with pytest.raises(LabError, match="discard"):
        sda.discard(0, ALIGN)  # QEMU drops discards during a backup job
    h = nbd_connect(dom.socket_path(), "sda", ["base:allocation"])
    try:
        assert h.get_size() == SIZE
        full = read_all(h, SIZE)
    finally:
        h.shutdown()
    dom.dom.abortJob()
    assert_bytes_equal(full, expect1.read_bytes(), "full backup export")
    assert [c.getName() for c in dom.dom.listAllCheckpoints()] == ["cp1"]

    # incremental relative to cp1: the bitmap holds seed-2 writes and the new ones
    ops3 = [data_op(5 * MiB, 2 * ALIGN, 99), pattern_op(9 * MiB, ALIGN, 0xC3), zero_op(12 * MiB, ALIGN),
            discard_op(1 * MiB, ALIGN)]
    sda.apply_all(ops3)
    dom.dom.backupBegin(backup_xml(dom, ["sda"], incremental="cp1"), checkpoint_xml("cp2", ["sda"]))
    expect2 = sda.snapshot("cp2")
    ctx = "qemu:dirty-bitmap:backup-sda"
    h = nbd_connect(dom.socket_path(), "sda", ["base:allocation", ctx])
    try:
        assert h.can_meta_context(ctx)
        dirty = flagged_ranges(h, SIZE, ctx, 1)
        changes = {off: h.pread(length, off) for off, length in dirty}
    finally:
        h.shutdown()
    dom.dom.abortJob()
    ops2 = random_writes(seed=2, n=6, size=SIZE, kinds=JOB_SAFE_KINDS)
    changed = [op for op in ops2 + ops3 if op.kind != "discard"]
    # every write is in the bitmap; nothing outside the ops is (QEMU leaves a
    # discard of never-written qcow2 clusters out: those bytes did not change)
    assert ranges_cover(dirty, ranges_of(changed))
    assert ranges_cover(ranges_of(ops2 + ops3), dirty)

    # full + incremental == expected image at cp2, byte for byte
    rebuilt = dom.dir / "rebuilt.raw"
    data = bytearray(full)
    for off, chunk in changes.items():
        data[off : off + len(chunk)] = chunk
    rebuilt.write_bytes(bytes(data))
    compare_images(rebuilt, expect2, fmt="raw")
    with pytest.raises(ImageMismatch):
        compare_images(expect1, expect2, fmt="raw")  # the check can fail
    names = sorted(c.getName() for c in dom.dom.listAllCheckpoints())
    assert names == ["cp1", "cp2"]
    assert dom.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE


def test_remove_ends_a_running_backup_job(make_domain) -> None:  # type: ignore[no-untyped-def]
    import libvirt

    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    dom.dom.backupBegin(backup_xml(dom, ["sda"]), checkpoint_xml("cp1", ["sda"]))
    assert dom.job_active()
    name, folder = dom.name, dom.dir
    dom.remove()  # the fixture's second remove() at teardown must be harmless
    with pytest.raises(libvirt.libvirtError):
        dom.conn.lookupByName(name)
    assert not folder.exists()


def test_sweep_removes_only_orphans(make_domain, libvirt_conn) -> None:  # type: ignore[no-untyped-def]
    import libvirt

    mine = make_domain(disks=[DiskSpec("sda", "sata", "raw", SIZE)])
    orphan = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | libvirt.VIR_DOMAIN_AFFECT_LIVE
    dead_owner = f"{OWNER_PREFIX}999999999:1"  # no such process
    orphan.dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_DESCRIPTION, dead_owner, None, None, flags)
    removed = sweep_orphans(libvirt_conn)
    assert orphan.name in removed and mine.name not in removed
    assert not orphan.dir.exists()
    assert mine.is_active() and mine.dir.exists()
    with pytest.raises(libvirt.libvirtError):
        libvirt_conn.lookupByName(orphan.name)


def incremental(dom: LabDomain, disk: str, since: str, name: str) -> tuple[list[tuple[int, int]], dict[int, bytes]]:
    """One incremental pull backup: (dirty ranges, their bytes) relative to ``since``."""
    dom.dom.backupBegin(backup_xml(dom, [disk], incremental=since), checkpoint_xml(name, [disk]))
    ctx = f"qemu:dirty-bitmap:backup-{disk}"
    h = nbd_connect(dom.socket_path(), disk, [ctx])
    try:
        size = h.get_size()
        dirty = flagged_ranges(h, size, ctx, 1)
        changes = {off: h.pread(length, off) for off, length in dirty}
    finally:
        h.shutdown()
    dom.dom.abortJob()
    return dirty, changes


def test_offline_writes_hotplug_resize_redefine(make_domain) -> None:  # type: ignore[no-untyped-def]
    """The lab's tools for chain tests: offline qemu-io writes land in the persistent
    bitmap, hot-added and resized disks track their shadows, redefine drops checkpoints."""
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    sda = dom.disk("sda")
    sda.apply_all(random_writes(seed=11, n=8, size=SIZE))
    dom.dom.backupBegin(backup_xml(dom, ["sda"]), checkpoint_xml("cp1", ["sda"]))
    dom.dom.abortJob()
    base = sda.snapshot("cp1")

    dom.stop()
    assert sda.bitmap_flags() == {"cp1": ["auto"]}  # stored cleanly, not in-use
    offline = [data_op(2 * MiB, 2 * ALIGN, 21), pattern_op(8 * MiB, ALIGN, 0x3C)]
    sda.apply_all(offline)  # qemu-io straight on the image
    sda.check_image()
    dom.start()
    dirty, changes = incremental(dom, "sda", "cp1", "cp2")
    assert dirty == ranges_of(offline)
    rebuilt = bytearray(base.read_bytes())
    for off, chunk in changes.items():
        rebuilt[off : off + len(chunk)] = chunk
    assert_bytes_equal(bytes(rebuilt), sda.expected(), "offline changes via the bitmap")

    sdb = dom.attach_disk(DiskSpec("sdb", "scsi", "qcow2", 8 * MiB))
    sdb.apply(data_op(ALIGN, ALIGN, 5))
    sdb.check_image()
    sda.resize(SIZE + 4 * MiB)
    sda.apply(pattern_op(SIZE + MiB, ALIGN, 0x99))
    sda.check_image()
    assert sda.size == SIZE + 4 * MiB

    with pytest.raises(LabError, match="stop the domain"):
        sda.remove_bitmap("cp2")
    dom.stop()
    sda.remove_bitmap("cp2")
    assert sda.bitmaps() == ["cp1"]
    dom.redefine()
    assert dom.dom.listAllCheckpoints() == []
    assert sorted(dom.disks) == ["sda", "sdb"]  # the hot-added disk is in the persistent config
    dom.start()
    assert dom.alias("sdb")
    sda.check_image()


def test_running_daemons_hold_no_lab_lock(libvirt_daemons) -> None:  # type: ignore[no-untyped-def]
    """A daemon started while a lab lock was held must not inherit the lock's fd:
    it would hold the start lock for its whole life and every later start or
    stop (scripts/lab/libvirtd, the fixture) would wait for ever."""
    import os

    from tests.lab.libvirt_lab import LOCK_FILE, START_LOCK_FILE, _lock_holders, _pids_of

    daemons = set(_pids_of("libvirtd") + _pids_of("virtlogd"))
    assert daemons, "no libvirtd/virtlogd running under the lab fixture"
    for path in (START_LOCK_FILE, LOCK_FILE):
        holders = set(_lock_holders(path)) - {os.getpid()}
        assert not holders & daemons, f"{path} is held open by daemon pids {sorted(holders & daemons)}"
