"""Which level really runs, which disks, parent checkpoint, names."""
from __future__ import annotations

from types import MappingProxyType

import pytest

from virtnbd import errors
from virtnbd.backup.options import BackupOptions
from virtnbd.backup.plan import make_plan
from virtnbd.backupset.manifest import Manifest, Point
from virtnbd.virt.domainxml import Disk

UUID = "uuid-1"
QCOW = Disk("sda", "sata", "qcow2", "file", "/a.qcow2")
QCOW2 = Disk("sdb", "sata", "qcow2", "file", "/b.qcow2")
RAW = Disk("vdc", "virtio", "raw", "file", "/c.raw")


def opts(level: str, **kw) -> BackupOptions:  # type: ignore[no-untyped-def]
    return BackupOptions(domain="d1", level=level, output="/b", **kw)


def point(name: str, level: str, parent: str | None, checkpoint: str | None, disks=("sda", "sdb", "vdc")) -> Point:  # type: ignore[no-untyped-def]
    return Point(name=name, level=level, parent=parent, checkpoint=checkpoint, time="t",
                 disks=MappingProxyType(dict.fromkeys(disks)))


def manifest(*points: Point, uuid: str = UUID) -> Manifest:
    return Manifest(domain="d1", domain_uuid=uuid, points=points)


def plan(level: str, m: Manifest | None, disks=(QCOW, QCOW2, RAW), **kw):  # type: ignore[no-untyped-def]
    return make_plan(opts(level, **kw), m, list(disks), 1700000000, folder="/b", domain="d1", uuid=UUID)


CHAIN = manifest(point("virtnbdbackup.0", "full", None, "virtnbdbackup.0"),
                 point("virtnbdbackup.1", "inc", "virtnbdbackup.0", "virtnbdbackup.1"),
                 point("diff.1699999999", "diff", "virtnbdbackup.1", None))


def test_auto_is_full_into_empty_folder_and_inc_after() -> None:
    p = plan("auto", None)
    assert (p.level, p.point, p.checkpoint, p.parent) == ("full", "virtnbdbackup.0", "virtnbdbackup.0", None)
    assert p.bitmap_disks == ("sda", "sdb")       # raw disks carry no bitmap
    assert [d.mode for d in p.disks] == ["full", "full", "full"]
    p = plan("auto", CHAIN)
    assert (p.level, p.point, p.checkpoint) == ("inc", "virtnbdbackup.2", "virtnbdbackup.2")
    assert p.parent == "virtnbdbackup.1"


def test_inc_parent_is_the_manifests_newest_full_or_inc() -> None:
    p = plan("inc", CHAIN)
    assert p.parent == "virtnbdbackup.1" and p.last_index == 1
    assert [(d.target, d.mode) for d in p.disks] == [("sda", "inc"), ("sdb", "inc"), ("vdc", "full")]
    assert "raw" in p.disks[2].reason


def test_diff_is_named_by_epoch_and_creates_no_checkpoint() -> None:
    p = plan("diff", CHAIN)
    assert (p.level, p.point, p.checkpoint, p.parent) == ("diff", "diff.1700000000", None, "virtnbdbackup.1")
    assert p.incremental == "virtnbdbackup.1"
    taken = manifest(*CHAIN.points, point("diff.1700000000", "diff", "virtnbdbackup.1", None))
    assert plan("diff", taken).point == "diff.1700000001"


def test_copy_has_no_checkpoint() -> None:
    p = plan("copy", None)
    assert (p.level, p.point, p.checkpoint) == ("copy", "copy", None)


def test_new_disk_in_inc_is_copied_whole() -> None:
    m = manifest(point("virtnbdbackup.0", "full", None, "virtnbdbackup.0", disks=("sda",)))
    p = plan("inc", m, disks=(QCOW, QCOW2))
    assert [(d.target, d.mode) for d in p.disks] == [("sda", "inc"), ("sdb", "full")]


def test_include_exclude() -> None:
    p = plan("full", None, include=("sda", "vdc"))
    assert [d.target for d in p.disks] == ["sda", "vdc"]
    assert p.skipped == (("sdb", "not in --include"),)
    p = plan("full", None, exclude=("sda",))
    assert [d.target for d in p.disks] == ["sdb", "vdc"]
    with pytest.raises(errors.UsageError, match="no disk vdz"):
        plan("full", None, exclude=("vdz",))
    with pytest.raises(errors.UsageError, match="no disk left"):
        plan("full", None, exclude=("sda", "sdb", "vdc"))


def test_refusals() -> None:
    with pytest.raises(errors.ChainError, match="no full backup"):
        plan("inc", None)
    with pytest.raises(errors.ChainError, match="no full backup"):
        plan("diff", manifest(point("copy", "copy", None, None)))
    with pytest.raises(errors.BackupSetError, match="holds the backup chain of domain d1"):
        plan("inc", manifest(*CHAIN.points, uuid="other"))
    with pytest.raises(errors.BackupSetError, match="already holds a backup chain"):
        plan("full", CHAIN)
    with pytest.raises(errors.BackupSetError, match="already holds"):
        plan("copy", CHAIN)


def test_compression_probe_pauses_after_a_streak_and_retries() -> None:
    from virtnbd.backup.copy import CompressionProbe
    from virtnbd.stream.format import EncodedFrame

    raw = EncodedFrame("data", 0, 100, b"h" * 48, b"x" * 100)
    packed = EncodedFrame("data", 0, 100, b"h" * 48, b"x" * 10)
    probe = CompressionProbe(streak=2, pause=3, max_pause=8)
    assert probe.try_compress()
    probe.compressed(raw)
    probe.compressed(packed)            # a success resets the streak
    probe.compressed(raw)
    assert probe.try_compress()
    probe.compressed(raw)               # second failure in a row: pause 3
    assert [probe.try_compress() for _ in range(4)] == [False, False, False, True]
    probe.compressed(raw)               # the probe failed: pause doubles to 6
    assert [probe.try_compress() for _ in range(7)] == [False] * 6 + [True]
    probe.compressed(raw)               # 12 -> capped at 8
    assert [probe.try_compress() for _ in range(9)] == [False] * 8 + [True]
    probe.compressed(packed)            # compressible again: back to normal
    assert probe.try_compress() and probe.pause == 3


def test_encode_threads_follow_the_cpus(monkeypatch):
    from virtnbd.backup import diskrun as run
    monkeypatch.setattr(run.os, "sched_getaffinity", lambda _pid: {0, 1})
    assert run.encode_thread_count(0) == 3
    monkeypatch.setattr(run.os, "sched_getaffinity", lambda _pid: set(range(64)))
    assert run.encode_thread_count(0) == run.MAX_ENCODE_THREADS + 1
    assert run.encode_thread_count(5) == 5


def test_raw_only_full_starts_a_chain_and_an_old_checkpointless_full_is_refused_clearly() -> None:
    p = plan("full", None, disks=(RAW,))
    assert (p.point, p.checkpoint, p.bitmap_disks) == ("virtnbdbackup.0", "virtnbdbackup.0", ())
    p = plan("inc", manifest(point("virtnbdbackup.0", "full", None, "virtnbdbackup.0", ("vdc",))), disks=(RAW,))
    assert (p.point, p.parent, p.bitmap_disks, p.disks[0].mode) == ("virtnbdbackup.1", "virtnbdbackup.0", (), "full")
    old = manifest(point("full", "full", None, None, ("vdc",)))      # written before raw-only fulls had a chain
    with pytest.raises(errors.ChainError, match=r"point full starts no chain .*run -l full into a new folder"):
        plan("inc", old, disks=(RAW,))
