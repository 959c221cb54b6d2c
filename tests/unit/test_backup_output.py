"""Backup folder side: lock, work dirs, side files (saved, and removed again on failure)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from virtnbd import errors
from virtnbd.backup import output
from virtnbd.backupset.store import LocalStore


def test_lock_refuses_a_second_holder_and_names_the_pid(tmp_path) -> None:  # type: ignore[no-untyped-def]
    folder = output.prepare_folder(str(tmp_path / "b"))
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    with output.folder_lock(folder):
        code = ("import sys; from pathlib import Path; from virtnbd.backup import output\n"
                "try:\n    output.folder_lock(Path(sys.argv[1])).__enter__()\n"
                "except Exception as e:\n    print(e); sys.exit(3)\n")
        proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=False)
        assert proc.returncode == 3
        assert f"locked by running process {os.getpid()}" in proc.stdout
    with output.folder_lock(folder):      # free again after release
        pass


def test_work_dir_is_removed_and_stale_ones_are_swept(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with output.work_dir(str(tmp_path)) as work:
        assert work.name.startswith(f"virtnbd.{os.getpid()}.")
        assert work.stat().st_mode & 0o7777 == output.QEMU_USER_MODE
        (work / "sda.scratch.qcow2").write_bytes(b"x")
    assert not work.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    stale = tmp_path / f"virtnbd.{dead}.abcd"
    stale.mkdir()
    live = tmp_path / f"virtnbd.{os.getpid()}.abcd"
    live.mkdir()
    assert output.remove_stale_work_dirs(str(tmp_path)) == [stale]
    assert live.exists()


def test_side_files_are_discarded_on_failure(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "src"
    src.mkdir()
    (src / "nvram.fd").write_bytes(b"vars")
    (src / "tpm").mkdir()
    (src / "tpm" / "tpm2-00.permall").write_bytes(b"state")
    folder = tmp_path / "b"
    folder.mkdir()
    side = output.SideFiles(LocalStore(folder))
    assert side.save("checkpoints/virtnbdbackup.0.xml", b"<x/>") == "checkpoints/virtnbdbackup.0.xml"
    assert side.copy_file("nvram.p.nvram.fd", str(src / "nvram.fd")) == "nvram.p.nvram.fd"
    assert side.copy_tree("tpm.p", str(src / "tpm")) == "tpm.p"
    assert side.copy_file("missing", str(src / "nope")) is None        # warned, not fatal
    assert (folder / "tpm.p" / "tpm2-00.permall").read_bytes() == b"state"
    assert (folder / "nvram.p.nvram.fd").read_bytes() == b"vars"
    side.discard()
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == []


def test_unwritable_folder_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "file"
    target.write_bytes(b"")
    with pytest.raises(errors.StorageError):
        output.prepare_folder(str(target / "sub"))
