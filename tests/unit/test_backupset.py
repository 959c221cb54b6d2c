"""Backup-set naming, manifest commit/load and chain resolution (virtnbd.backupset)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from virtnbd import errors
from virtnbd.backupset import chain, manifest, naming
from virtnbd.backupset.manifest import DiskEntry, Point

UUID = "6f1e0e35-1a52-4a4b-9f0e-1b1f0b0c0d0e"


def test_data_file_names() -> None:
    assert naming.data_file("sda", "copy", "copy") == "sda.copy.data"
    assert naming.data_file("sda", "full", "virtnbdbackup.0") == "sda.full.data"
    assert naming.data_file("vdb", "inc", "virtnbdbackup.3") == "vdb.inc.virtnbdbackup.3.data"
    assert naming.data_file("sda", "diff", "diff.1700000000") == "sda.diff.1700000000.data"
    assert naming.checkpoint_number(naming.checkpoint_name(7)) == 7
    with pytest.raises(errors.UsageError):
        naming.data_file("../x", "full", "virtnbdbackup.0")
    with pytest.raises(errors.UsageError):
        naming.data_file("sda", "weekly", "x")


def make_point(folder: Path, name: str, level: str, parent: str | None, size: int = 10) -> Point:
    file = naming.data_file("sda", level, name)
    (folder / file).write_bytes(b"x" * size)
    disk = DiskEntry(disk="sda", file=file, disk_format="qcow2", virtual_size=1 << 20, level=level,
                     stored_bytes=size, data_bytes=4096, zero_bytes=0, digest="00" * 16, file_digest="11" * 16)
    return Point(name=name, level=level, parent=parent,
                 checkpoint=name if level in ("full", "inc") else None,
                 time="2026-11-22T04:00:00+00:00", disks={"sda": disk}, domain_xml="<domain/>",
                 checkpoint_xml=None, consistency="crash")


def build_chain(folder: Path) -> manifest.Manifest:
    manifest.commit_point(folder, make_point(folder, "virtnbdbackup.0", "full", None), "vm", UUID)
    manifest.commit_point(folder, make_point(folder, "virtnbdbackup.1", "inc", "virtnbdbackup.0"), "vm", UUID)
    manifest.commit_point(folder, make_point(folder, "diff.1700000000", "diff", "virtnbdbackup.1"), "vm", UUID)
    return manifest.commit_point(folder, make_point(folder, "virtnbdbackup.2", "inc", "virtnbdbackup.1"), "vm", UUID)


def test_commit_and_load_round_trip(tmp_path: Path) -> None:
    assert manifest.load(tmp_path) is None
    committed = build_chain(tmp_path)
    loaded = manifest.load(tmp_path)
    assert loaded == committed
    doc = json.loads((tmp_path / naming.MANIFEST).read_text())
    assert doc["format"] == "virtnbd-backupset" and doc["version"] == 1
    assert [p["name"] for p in doc["points"]] == ["virtnbdbackup.0", "virtnbdbackup.1", "diff.1700000000",
                                                  "virtnbdbackup.2"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_resolve_by_parent_links(tmp_path: Path) -> None:
    m = build_chain(tmp_path)
    names = lambda pts: [p.name for p in pts]  # noqa: E731
    assert names(chain.resolve(m, None)) == ["virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2"]
    assert names(chain.resolve(m, "virtnbdbackup.1")) == ["virtnbdbackup.0", "virtnbdbackup.1"]
    assert names(chain.resolve(m, "diff.1700000000")) == ["virtnbdbackup.0", "virtnbdbackup.1", "diff.1700000000"]
    assert names(chain.resolve(m, "virtnbdbackup.0")) == ["virtnbdbackup.0"]
    with pytest.raises(errors.ChainError, match="available: virtnbdbackup.0, virtnbdbackup.1"):
        chain.resolve(m, "virtnbdbackup.9")


def test_resolve_copy_alone(tmp_path: Path) -> None:
    m = manifest.commit_point(tmp_path, make_point(tmp_path, "copy", "copy", None), "vm", UUID)
    assert [p.name for p in chain.resolve(m, "copy")] == ["copy"]


def test_resolve_detects_missing_and_truncated_files(tmp_path: Path) -> None:
    m = build_chain(tmp_path)
    (tmp_path / "sda.inc.virtnbdbackup.1.data").unlink()
    with pytest.raises(errors.ChainError, match=r"point virtnbdbackup.1: file .*sda.inc.virtnbdbackup.1.data"):
        chain.resolve(m, None)
    assert [p.name for p in chain.resolve(m, "virtnbdbackup.0")] == ["virtnbdbackup.0"]
    (tmp_path / "sda.full.data").write_bytes(b"x" * 3)
    with pytest.raises(errors.FormatError, match="point virtnbdbackup.0"):
        chain.resolve(m, "virtnbdbackup.0")


def test_commit_rejects_bad_links(tmp_path: Path) -> None:
    with pytest.raises(errors.ChainError, match="full backup first"):
        manifest.commit_point(tmp_path, make_point(tmp_path, "virtnbdbackup.1", "inc", "virtnbdbackup.0"), "vm", UUID)
    build_chain(tmp_path)
    with pytest.raises(errors.ChainError, match="newest full/inc"):
        manifest.commit_point(tmp_path, make_point(tmp_path, "virtnbdbackup.3", "inc", "virtnbdbackup.1"), "vm", UUID)
    with pytest.raises(errors.ChainError, match="already exists"):
        manifest.commit_point(tmp_path, make_point(tmp_path, "virtnbdbackup.2", "inc", "virtnbdbackup.2"), "vm", UUID)
    with pytest.raises(errors.BackupSetError, match="other"):
        manifest.commit_point(tmp_path, make_point(tmp_path, "virtnbdbackup.3", "inc", "virtnbdbackup.2"),
                              "other", "another-uuid")
    bad = make_point(tmp_path, "virtnbdbackup.3", "inc", "virtnbdbackup.2")
    (tmp_path / "sda.inc.virtnbdbackup.3.data").unlink()
    with pytest.raises(errors.BackupSetError, match="virtnbdbackup.3"):
        manifest.commit_point(tmp_path, bad, "vm", UUID)
    assert len(manifest.load(tmp_path).points) == 4  # type: ignore[union-attr]


def test_damaged_manifest_is_a_format_error(tmp_path: Path) -> None:
    build_chain(tmp_path)
    path = tmp_path / naming.MANIFEST
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(errors.FormatError, match="not JSON"):
        manifest.load(tmp_path)
    doc = json.loads(text)
    del doc["points"][1]["parent"]
    path.write_text(json.dumps(doc))
    with pytest.raises(errors.FormatError, match=r"points\[1\]: missing key 'parent'"):
        manifest.load(tmp_path)
    doc = json.loads(text)
    doc["version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(errors.FormatError, match="unsupported manifest version 99"):
        manifest.load(tmp_path)
