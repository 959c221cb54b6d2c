"""README: "Existing images are never overwritten" -- for qcow2 and raw outputs (RBD: test_rbd_restore).
A restore whose output image exists fails with one clear line, leaves the image byte for byte as it was
and leaves no partial file behind."""
from __future__ import annotations

from pathlib import Path

import pytest

from virtnbd.cli.restore import main

SET = Path(__file__).resolve().parents[1] / "data" / "upstream-sets" / "plain"


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_existing_image_is_not_overwritten(tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    precious = out / f"sda.{fmt}"
    precious.write_bytes(b"precious data, not a disk image\n" * 1000)
    before = precious.read_bytes()
    assert main(["-i", str(SET), "-o", str(out), "-n", "--format", fmt]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "refusing to overwrite" in last and str(precious) in last
    assert precious.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [precious.name]


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_the_same_restore_into_a_fresh_folder_works(tmp_path: Path, fmt: str) -> None:
    """The control: the refusal above is about the existing file, not about the set or the format."""
    assert main(["-i", str(SET), "-o", str(tmp_path / "out"), "-n", "--format", fmt]) == 0
    assert (tmp_path / "out" / f"sda.{fmt}").stat().st_size > 0
