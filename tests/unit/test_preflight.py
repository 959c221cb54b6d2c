"""Pure parts of the chain checks: bitmaps of qemu-img info, resized disks, archive/recovery, modes."""
from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from virtnbd import errors
from virtnbd.backup import archive, consistency, modes, offline, recovery
from virtnbd.backup.plan import Plan, PlannedDisk
from virtnbd.backupset import naming
from virtnbd.backupset.store import LocalStore
from virtnbd.virt import bitmaps
from virtnbd.virt.domainxml import Disk

QCOW = Disk(target="sda", bus="sata", format="qcow2", source_type="file", path="/img/sda.qcow2")
RAW = Disk(target="sdb", bus="sata", format="raw", source_type="file", path="/img/sdb.raw")


def _plan(*disks: PlannedDisk, level: str = "inc") -> Plan:
    return Plan(level, "virtnbdbackup.2", "virtnbdbackup.2", "virtnbdbackup.1", disks, (), ("sda",), 1)


def test_parse_bitmaps_flags_and_broken() -> None:
    info = {"format-specific": {"type": "qcow2", "data": {"bitmaps": [
        {"name": "virtnbdbackup.0", "flags": ["auto"], "granularity": 65536},
        {"name": "virtnbdbackup.1", "flags": ["in-use", "auto"], "granularity": 65536},
        {"name": "other", "flags": ["inconsistent"], "granularity": 65536}]}}}
    found = bitmaps.parse_bitmaps(info)
    assert sorted(found) == ["other", "virtnbdbackup.0", "virtnbdbackup.1"]
    assert not found["virtnbdbackup.0"].broken
    assert found["virtnbdbackup.1"].broken and found["other"].broken
    assert bitmaps.parse_bitmaps({"format": "raw"}) == {}


def test_resized_disk_is_read_whole_others_untouched() -> None:
    plan = _plan(PlannedDisk(QCOW, "inc"), PlannedDisk(RAW, "full", "raw disks have no dirty bitmap"))
    parent = SimpleNamespace(disks={"sda": SimpleNamespace(virtual_size=16 << 20),
                                    "sdb": SimpleNamespace(virtual_size=16 << 20)})
    same = consistency.whole_if_resized(plan, parent, {"sda": 16 << 20, "sdb": 32 << 20})
    assert [pd.mode for pd in same.disks] == ["inc", "full"]
    grown = consistency.whole_if_resized(plan, parent, {"sda": 24 << 20, "sdb": 16 << 20})
    assert grown.disks[0].mode == "full"
    assert "size changed from 16777216 to 25165824" in grown.disks[0].reason
    unknown = consistency.whole_if_resized(plan, parent, {"sda": None})
    assert unknown.disks[0].mode == "inc"


def test_network_disk_offline_is_refused_with_what_to_do() -> None:
    disk = Disk(target="vda", bus="virtio", format="raw", source_type="network", path=None, protocol="rbd",
                name="pool/img")
    plan = _plan(PlannedDisk(disk, "full"), level="full")
    with pytest.raises(errors.UsageError, match="start the domain and run the backup online"):
        offline.check_disks(plan, "dom")


def test_offline_checkpoint_xml_names_parent_bitmaps_and_domain() -> None:
    plan = _plan(PlannedDisk(QCOW, "inc"), PlannedDisk(RAW, "full"))
    xml = offline.checkpoint_xml(plan, ["sda", "sdb"], "<domain type='qemu'><name>d</name></domain>", 1700000000)
    assert "<name>virtnbdbackup.1</name>" in xml.split("<parent>")[1]
    assert "<disk name=\"sda\" checkpoint=\"bitmap\" bitmap=\"virtnbdbackup.2\"/>" in xml
    assert "<disk name=\"sdb\" checkpoint=\"no\"/>" in xml
    assert "<creationTime>1700000000</creationTime>" in xml and "<domain type=\"qemu\">" in xml


def _chain(folder: Path) -> None:
    for name in ("sda.full.data", "sda.inc.virtnbdbackup.1.data", "vmconfig.virtnbdbackup.0.xml",
                 "backup.full.1.log", naming.MANIFEST, ".virtnbdbackup.lock"):
        (folder / name).write_bytes(name.encode())
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "virtnbdbackup.0.xml").write_text("x")


def test_archive_moves_the_whole_chain_but_the_lock(tmp_path: Path) -> None:
    _chain(tmp_path)
    moved = archive.archive(tmp_path, "20261122-010203")
    assert moved == tmp_path / "chain-20261122-010203"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".virtnbdbackup.lock", "chain-20261122-010203"]
    assert (moved / naming.MANIFEST).read_bytes() == naming.MANIFEST.encode()
    assert (moved / "checkpoints" / "virtnbdbackup.0.xml").exists()
    # a second archive in the same second gets its own name and leaves the first alone
    (tmp_path / naming.MANIFEST).write_text("{}")
    second = archive.archive(tmp_path, "20261122-010203")
    assert second.name == "chain-20261122-010203.2" and (moved / naming.MANIFEST).exists()


def test_recovery_finishes_an_interrupted_archive_and_removes_partials(tmp_path: Path) -> None:
    _chain(tmp_path)
    tmp = tmp_path / ".chain-1.moving"
    tmp.mkdir()
    os.replace(tmp_path / "sda.full.data", tmp / "sda.full.data")      # killed after the first file
    (tmp_path / "sda.inc.virtnbdbackup.2.data.partial").write_bytes(b"half")
    changed = recovery.recover(LocalStore(tmp_path))
    final = tmp_path / "chain-1"
    assert final.name in changed
    assert sorted(p.name for p in tmp_path.iterdir()) == [".virtnbdbackup.lock", "chain-1"]
    assert {p.name for p in final.iterdir()} >= {"sda.full.data", "sda.inc.virtnbdbackup.1.data", naming.MANIFEST}
    assert not list(tmp_path.glob("*.partial"))


def test_recovery_removes_stale_partial_and_tmp(tmp_path: Path) -> None:
    (tmp_path / "sda.full.data.partial").write_bytes(b"x")
    (tmp_path / f".{naming.MANIFEST}.tmp").write_bytes(b"x")
    (tmp_path / "sda.full.data").write_bytes(b"keep")
    recovery.recover(LocalStore(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sda.full.data"]


def test_modes_private_by_default_and_umask_applied(tmp_path: Path) -> None:
    with modes.umask(None):
        (tmp_path / "a").mkdir()
        fd = os.open(tmp_path / "a" / "f", os.O_CREAT | os.O_WRONLY, 0o666)
        os.close(fd)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a" / "f").stat().st_mode) == 0o600
    modes.apply(tmp_path / "a", None)
    assert stat.S_IMODE((tmp_path / "a" / "f").stat().st_mode) == 0o600
    modes.apply(tmp_path / "a", 0o022)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "a" / "f").stat().st_mode) == 0o644


def test_cli_options(tmp_path: Path) -> None:
    from virtnbd.cli import backup as cli
    opts = cli.parse(["-d", "x", "-o", str(tmp_path), "-l", "inc", "--fallback-full", "--umask", "027"])
    assert opts.fallback_full and opts.umask == 0o027
    assert cli.parse(["-d", "x", "-o", str(tmp_path)]).umask is None
    with pytest.raises(errors.UsageError, match="not an octal umask"):
        cli.parse(["-d", "x", "-o", str(tmp_path), "--umask", "999"])
    with pytest.raises(errors.UsageError, match="out of range"):
        cli.parse(["-d", "x", "-o", str(tmp_path), "--umask", "1777"])


def test_preflight_without_problems_keeps_the_plan() -> None:
    plan = _plan(PlannedDisk(QCOW, "inc"), level="full")
    verdict = consistency.preflight(SimpleNamespace(printonly=False), None, Path("/nonexistent"),  # type: ignore[arg-type]
                                    object(), plan, running=False, replan=lambda o, m: plan)
    assert verdict.plan is plan and verdict.note == ""
