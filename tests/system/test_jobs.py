"""virtnbdjob: unit files systemd accepts, full then inc from the job's command, nothing left behind."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab.libvirt_lab import DiskSpec, MiB
from tests.system.backup_helpers import REPO

pytestmark = pytest.mark.system

JOB = str(REPO / "virtnbdjob")


def _job(places: list[str], *argv: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, JOB, *argv[:2], *places, *argv[2:]], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_scheduled_job_full_then_inc_and_no_leftovers(make_domain, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", 4 * MiB)])
    job_dir, unit_dir, folder = tmp_path / "jobs", tmp_path / "units", tmp_path / "backup"
    places = ["--job-dir", str(job_dir), "--unit-dir", str(unit_dir)]
    _job(places, "create", "nightly", "--schedule", "*-*-* 02:00", "--", "-d", dom.name, "-l", "auto",
         "-o", str(folder), "-n", "--scratchdir", str(dom.dir))
    _job(places, "enable", "nightly")
    assert "nightly\tenabled\t*-*-* 02:00" in _job(places, "list").stdout
    verify = tmp_path / "verify"
    verify.mkdir()
    for unit in ("service", "timer"):
        shutil.copy(unit_dir / f"virtnbdbackup@.{unit}", verify / f"virtnbdbackup@nightly.{unit}")
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, verify.iterdir())],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    timer = (unit_dir / "virtnbdbackup@.timer").read_text()
    assert "Persistent=true" in timer and "RandomizedDelaySec=" in timer
    assert "OnCalendar=*-*-* 02:00" in (unit_dir / "virtnbdbackup@nightly.timer.d" / "schedule.conf").read_text()

    dom.disk("sda").write_data(0, MiB, seed=1)
    _job(places, "run", "nightly")
    dom.disk("sda").write_data(2 * MiB, MiB, seed=2)
    _job(places, "run", "nightly")
    points = json.loads((folder / "virtnbd.manifest.json").read_text())["points"]
    assert [p["level"] for p in points] == ["full", "inc"]

    _job(places, "disable", "nightly")
    assert not (unit_dir / "timers.target.wants").exists()
    assert "nightly\tdisabled" in _job(places, "list").stdout
    _job(places, "remove", "nightly")
    assert list(unit_dir.rglob("*")) == [] and not job_dir.exists()
