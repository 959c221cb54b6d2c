"""The backup-set interface (backupset/api.py) and stores by location (backupset/store.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.unit.stream_helpers import meta
from virtnbd import errors
from virtnbd.backupset import api, manifest, store
from virtnbd.backupset.manifest import Point
from virtnbd.stream import StreamWriter

UUID = "6f1e0e35-1a52-4a4b-9f0e-1b1f0b0c0d0e"


def write_point(bset: api.BackupSet, data: bytes) -> Point:
    name = bset.data_name("sda", "full", "virtnbdbackup.0")
    m = meta(None, size=1 << 20)
    with bset.create_data(name) as f:
        assert bset.store.size(name) is None            # nothing under the final name while writing
        with StreamWriter(f, m, path=bset.store.describe(name)) as w:
            w.write_data(0, data)
            totals = w.finish()
    entry = manifest.disk_entry(m, name, totals)
    return Point(name="virtnbdbackup.0", level="full", parent=None, checkpoint="virtnbdbackup.0",
                 time=m.time, disks={"sda": entry})


def test_create_commit_open_read(tmp_path: Path) -> None:
    location = tmp_path / "set"
    bset = api.create_set(location)
    assert oct(location.stat().st_mode & 0o777) == "0o700" and bset.kind == "stream"
    with bset.lock():
        point = write_point(bset, b"q" * 70000)
        bset.commit(point, "vm", UUID)
    again = api.open_set(location)
    assert again.kind == "stream"
    chain = again.chain(None)
    assert [p.name for p in chain] == ["virtnbdbackup.0"]
    with again.open_data(chain[-1].disks["sda"]) as reader:
        assert reader.read_range(69990, 20) == b"q" * 10 + bytes(10)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    bset = api.create_set(tmp_path)
    with pytest.raises(RuntimeError), bset.create_data("sda.full.data") as f:
        f.write(b"half")
        raise RuntimeError("killed")
    assert bset.store.list() == []


def test_lock_refuses_a_second_holder(tmp_path: Path) -> None:
    bset = api.create_set(tmp_path)
    with bset.lock():
        pid = os.fork()
        if pid == 0:   # child: a second run
            try:
                with api.create_set(tmp_path).lock():
                    os._exit(0)
            except errors.LockedError:
                os._exit(3)
        assert os.waitpid(pid, 0)[1] >> 8 == 3


def test_unknown_scheme_is_refused_and_creates_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.BackupSetError, match="unknown storage scheme ftp://"):
        api.create_set("ftp://host/vm")
    with pytest.raises(errors.BackupSetError, match=r"unknown storage scheme.*s3://"):
        api.open_set("ftp://host/vm")
    assert list(tmp_path.iterdir()) == []


def test_registered_scheme_and_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "_STORES", {})
    store.register("mem", lambda location: store.LocalStore(tmp_path / location.split("://")[1]))
    bset = api.create_set("mem://x")
    assert bset.store.location == str(tmp_path / "x")
    assert isinstance(store.open_store("plain/path"), store.LocalStore)
    seen: list[str] = []
    monkeypatch.setattr(api, "_KINDS", dict(api._KINDS))
    api.register_kind("probe-only", lambda s: seen.append(s.location), api.StreamSet)  # type: ignore[func-returns-value]
    with pytest.raises(errors.BackupSetError, match="not a backup folder"):
        api.open_set(tmp_path)
    assert seen == [str(tmp_path)]       # every registered kind is asked


def test_open_set_errors(tmp_path: Path) -> None:
    with pytest.raises(errors.BackupSetError, match="no such backup folder"):
        api.open_set(tmp_path / "missing")
    with pytest.raises(errors.BackupSetError, match="not a backup folder"):
        api.open_set(tmp_path)
    with pytest.raises(errors.UsageError, match="unknown kind"):
        api.create_set(tmp_path, "tape")


def _stream_point(bset: api.BackupSet, name: str, level: str, parent: str | None,
                  layout: list[tuple[str, int, bytes | int]]) -> Point:
    file = bset.data_name("sda", level, name)
    m = meta(None, size=1 << 20, level=level, checkpoint=name, parent=parent)
    with bset.create_data(file) as f, StreamWriter(f, m, path=bset.store.describe(file)) as w:
        for kind, off, val in layout:
            w.write_data(off, val) if kind == "data" else w.write_zero(off, val)  # type: ignore[arg-type]
        totals = w.finish()
    return Point(name=name, level=level, parent=parent, checkpoint=name, time=m.time,
                 disks={"sda": manifest.disk_entry(m, file, totals)})


def test_disk_view_reads_any_range_at_any_point_newest_layer_wins(tmp_path: Path) -> None:
    bset = api.create_set(tmp_path)
    full = [("data", 0, b"A" * 8192), ("zero", 8192, 8192), ("data", 16384, b"B" * 4096),
            ("zero", 20480, (1 << 20) - 20480)]
    inc = [("data", 4096, b"C" * 4096), ("zero", 16384, 2048)]
    bset.commit(_stream_point(bset, "virtnbdbackup.0", "full", None, full), "vm", UUID)   # type: ignore[arg-type]
    bset.commit(_stream_point(bset, "virtnbdbackup.1", "inc", "virtnbdbackup.0", inc), "vm", UUID)  # type: ignore[arg-type]
    with api.open_disk(api.open_set(tmp_path), None, "sda") as view:
        assert view.read_range(0, 20480) == b"A" * 4096 + b"C" * 4096 + bytes(10240) + b"B" * 2048
        assert view.read_range(4000, 200) == b"A" * 96 + b"C" * 104
    with api.open_disk(api.open_set(tmp_path), "virtnbdbackup.0", "sda") as view:
        assert view.read_range(4096, 4096) == b"A" * 4096
        assert view.read_range(16384, 4096) == b"B" * 4096
        with pytest.raises(errors.UsageError):
            view.read_range((1 << 20) - 1, 2)
