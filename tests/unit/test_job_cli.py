"""virtnbdjob argv checks and the bash completion file."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from virtnbd import errors
from virtnbd.cli import job

ROOT = Path(__file__).resolve().parents[2]


def test_create_checks_the_backup_arguments_and_schedule_now(tmp_path: Path) -> None:
    places = ["--job-dir", str(tmp_path / "j"), "--unit-dir", str(tmp_path / "u")]
    with pytest.raises(errors.UsageError, match="lz4 compression level 99"):
        job.parse(["create", "n", *places, "--", "-d", "vm", "-o", "/b", "-z", "99"])
    assert job.main(["create", "a/b", *places, "--", "-d", "vm", "-o", "/b"]) == errors.EXIT_ERROR
    o = job.parse(["create", "n", *places, "--schedule", "not a time", "--", "-d", "vm", "-o", "/b"])
    with pytest.raises(errors.UsageError, match="--schedule"):
        job.jobs.create(o.places, "n", o.args, o.schedule)
    assert not (tmp_path / "j").exists() and not (tmp_path / "u").exists()
    with pytest.raises(errors.UsageError, match="takes no virtnbdbackup arguments"):
        job.parse(["run", "n", "--", "-d", "x"])


def test_bash_completion_offers_options_levels_and_commands() -> None:
    script = (f"source {ROOT}/contrib/bash-completion/virtnbd; "
              f"COMP_WORDS=({ROOT}/virtnbdbackup --metr); COMP_CWORD=1; _virtnbd; echo ${{COMPREPLY[@]}}; "
              "COMP_WORDS=(virtnbdbackup -l i); COMP_CWORD=2; _virtnbd; echo ${COMPREPLY[@]}; "
              "COMP_WORDS=(virtnbdjob dis); COMP_CWORD=1; _virtnbd; echo ${COMPREPLY[@]}")
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.splitlines() == ["--metrics-file", "inc", "disable"]
