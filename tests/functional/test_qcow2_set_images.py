"""qcow2 set building blocks with real qemu-img / qemu-nbd (no libvirt): the interface push mode uses too.

prepare_image -> write through qemu-nbd -> finish_image -> Qcow2Set.commit, then open_set reads the
points back (own clusters per layer), an overlay's zero clusters hide its backing, the integrity
check names the region of a changed byte, and a stream backup into the folder is refused.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import MappingProxyType

import pytest

from virtnbd import errors
from virtnbd.backupset import qcow2set
from virtnbd.backupset.api import create_set, open_disk, open_set
from virtnbd.backupset.manifest import Point
from virtnbd.backupset.qcow2integrity import check_integrity, image_integrity, region_for
from virtnbd.restore.targets.qcow2 import ServedImage

MiB = 1 << 20
SIZE = 8 * MiB


def _write(image: qcow2set.PreparedImage, writes: list[tuple[int, bytes | None, int]]) -> None:
    served = ServedImage(image.path, workers=1, persistent=False)
    served.start()
    try:
        for offset, data, length in writes:
            if data is None:
                served.zero(offset, length)
            else:
                served.write(offset, data)
        served.finish()
    except BaseException:
        served.stop()
        raise


def _point(name: str, level: str, parent: str | None, entry: object) -> Point:
    return Point(name=name, level=level, parent=parent, checkpoint=name, time="2026-12-05T00:00:00+00:00",
                 disks=MappingProxyType({"sda": entry}))


def _add(bset, name: str, level: str, parent: str | None, writes) -> None:  # type: ignore[no-untyped-def]
    backing = qcow2set.backing_image(bset.manifest(), parent, "sda")
    image = qcow2set.prepare_image(bset, disk="sda", point=name, level=level, virtual_size=SIZE, backing=backing,
                                   checkpoint=name, parent=parent)
    _write(image, writes)
    entry = qcow2set.finish_image(bset, image, data_bytes=0, zero_bytes=0)
    bset.commit(_point(name, level, parent, entry), "vm", "uuid-1")


def test_set_built_and_read_back(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    bset = create_set(str(folder), "qcow2")
    ones, twos = b"\x01" * MiB, b"\x02" * (64 << 10)
    _add(bset, "virtnbdbackup.0", "full", None, [(0, ones, MiB), (4 * MiB, ones, MiB)])
    _add(bset, "virtnbdbackup.1", "inc", "virtnbdbackup.0", [(0, None, 64 << 10), (2 * MiB, twos, 64 << 10)])
    assert sorted(p.name for p in folder.iterdir()) == ["sda.virtnbdbackup.0.qcow2", "sda.virtnbdbackup.1.qcow2",
                                                        "virtnbd.manifest.json", "virtnbd.set.json"]
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(folder / "sda.virtnbdbackup.1.qcow2")],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["backing-filename"] == "sda.virtnbdbackup.0.qcow2" and info["backing-filename-format"] == "qcow2"
    assert oct(os.stat(folder / "sda.virtnbdbackup.1.qcow2").st_mode & 0o777) == "0o600"

    found = open_set(str(folder))
    assert found.kind == "qcow2"
    with found.open_data(found.chain(None)[-1].disks["sda"]) as reader:
        kinds = {(f.kind, f.offset, f.length) for f in reader.frames()}
        assert ("zero", 0, 64 << 10) in kinds and ("data", 2 * MiB, 64 << 10) in kinds
        assert not any(f.offset == 4 * MiB for f in reader.frames())    # inherited: not its own
        assert reader.meta.parent == "virtnbdbackup.0" and reader.meta.level == "inc"
    with open_disk(found, None, "sda") as view:
        assert view.read_range(0, 128 << 10) == bytes(64 << 10) + b"\x01" * (64 << 10)   # zero cluster hides backing
        assert view.read_range(2 * MiB, 64 << 10) == twos
        assert view.read_range(4 * MiB, MiB) == ones
    with open_disk(found, "virtnbdbackup.0", "sda") as view:
        assert view.read_range(0, 64 << 10) == b"\x01" * (64 << 10)

    with pytest.raises(errors.UsageError, match="holds a qcow2 set"):
        create_set(str(folder), "stream")
    with pytest.raises(errors.BackupSetError, match="belongs to a committed point"):
        qcow2set.prepare_image(found, disk="sda", point="virtnbdbackup.1", level="inc", virtual_size=SIZE,
                               backing=None, checkpoint=None, parent=None)


def test_stream_folder_refuses_qcow2(tmp_path: Path) -> None:
    (tmp_path / "virtnbd.manifest.json").write_text("{}")
    with pytest.raises(errors.UsageError, match="holds a stream set"):
        create_set(str(tmp_path), "qcow2")


def test_integrity_names_the_region(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(5 * MiB + 17))
    record = image_integrity(str(path))
    assert record.region_bytes == MiB and len(record.regions) == 6 and record.size == 5 * MiB + 17
    check_integrity(str(path), record)
    with path.open("r+b") as f:
        f.seek(3 * MiB + 5)
        byte = f.read(1)
        f.seek(3 * MiB + 5)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(errors.FormatError, match=f"file bytes {3 * MiB}..{4 * MiB} changed") as err:
        check_integrity(str(path), record)
    assert err.value.fields["path"] == str(path)


def test_region_size_bounded() -> None:
    assert region_for(0) == MiB and region_for(256 * MiB) == MiB
    assert region_for(256 * MiB + 1) == 2 * MiB
    assert region_for(4 << 30) == 16 * MiB


def test_sequence_of_qcow2_images_restores(tmp_path: Path) -> None:
    """virtnbdrestore --sequence takes a set's qcow2 images (root first), checked by the set's records."""
    import sys

    folder = tmp_path / "set"
    bset = create_set(str(folder), "qcow2")
    ones = b"\x01" * MiB
    _add(bset, "virtnbdbackup.0", "full", None, [(0, ones, MiB)])
    _add(bset, "virtnbdbackup.1", "inc", "virtnbdbackup.0", [(0, None, 64 << 10), (MiB, ones, MiB)])
    files = [str(folder / f"sda.virtnbdbackup.{n}.qcow2") for n in (0, 1)]
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(root / "virtnbdrestore"), "-n", "-i", str(folder), "--sequence", ",".join(files),
           "-o", str(tmp_path / "out"), "--format", "raw"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    data = (tmp_path / "out" / "sda.raw").read_bytes()
    assert len(data) == SIZE and data[:2 * MiB] == bytes(64 << 10) + b"\x01" * (2 * MiB - (64 << 10))
    assert data[2 * MiB:] == bytes(SIZE - 2 * MiB)
    proc = subprocess.run([*cmd[:6], files[1], *cmd[7:]], capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "first file is a inc" in proc.stderr
