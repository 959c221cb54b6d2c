"""Many domains per run: --all over three real domains, one failing; hooks; metrics."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab.libvirt_lab import DiskSpec, MiB, compare_images
from tests.system.backup_helpers import BACKUP, REPO

pytestmark = pytest.mark.system

RESTORE = str(REPO / "virtnbdrestore")
HOOK = """#!/bin/sh
env | grep '^VIRTNBD_' | sort | tr '\\n' ' ' >> {log}
echo >> {log}
[ "$VIRTNBD_PHASE" = start ] && [ "$VIRTNBD_DOMAIN" = "{skip}" ] && exit 3
exit 0
"""


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def test_all_three_domains_one_fails(make_domain, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    doms = [make_domain(disks=[DiskSpec("sda", "sata", "qcow2", 8 * MiB)]) for _ in range(3)]
    for n, dom in enumerate(doms):
        dom.disk("sda").write_data(n * MiB, 2 * MiB, seed=n + 1)
    good, bad = doms[:2], doms[2]
    root = tmp_path / "root"
    root.mkdir()
    (root / bad.name).write_text("not a folder")        # this domain's backup folder cannot be made
    metrics = tmp_path / "virtnbd.prom"
    match = ",".join(d.name for d in doms)               # --all, limited to this test's domains
    cmd = [sys.executable, BACKUP, "--all", "--match", match, "-l", "full", "-o", str(root), "-n", "--json",
           "--scratchdir", str(doms[0].dir), "--parallel", "2", "--metrics-file", str(metrics)]
    proc = _run(cmd)
    assert proc.returncode == 1, proc.stderr
    assert f"1 of 3 domains failed: {bad.name}" in proc.stderr
    entries = {e["domain"]: e for e in json.loads(proc.stdout)["domains"]}
    assert set(entries) == {d.name for d in doms}
    assert entries[bad.name]["status"] == "failed" and entries[bad.name]["error"]
    table = [line for line in proc.stderr.splitlines() if bad.name in line and "failed" in line]
    assert table, proc.stderr
    prom = metrics.read_text()
    assert f'virtnbd_backup_success{{domain="{bad.name}"}} 0' in prom
    assert f'virtnbd_backup_failures_total{{domain="{bad.name}"}} 1' in prom
    for dom in good:
        assert entries[dom.name]["status"] == "ok"
        assert f'virtnbd_backup_success{{domain="{dom.name}"}} 1' in prom
        assert f'virtnbd_backup_last_success_timestamp_seconds{{domain="{dom.name}"}}' in prom
        out = tmp_path / f"restore-{dom.name}"
        res = _run([sys.executable, RESTORE, "-i", str(root / dom.name), "-o", str(out), "--format", "raw", "-n"])
        assert res.returncode == 0, res.stderr
        compare_images(out / "sda.raw", dom.disk("sda").snapshot("full"), fmt="raw")


def test_hooks_see_each_phase_and_a_failing_start_skips(make_domain, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    doms = [make_domain(disks=[DiskSpec("sda", "sata", "qcow2", 4 * MiB)]) for _ in range(2)]
    record = tmp_path / "hook.log"
    hook = tmp_path / "hook.sh"
    hook.write_text(HOOK.format(log=record, skip=doms[1].name))
    hook.chmod(0o755)
    root = tmp_path / "root"
    cmd = [sys.executable, BACKUP, "-d", ",".join(d.name for d in doms), "-l", "full", "-o", str(root), "-n",
           "--scratchdir", str(doms[0].dir), "--hook", str(hook)]
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stderr
    assert f"{doms[1].name} skipped: the start hook failed" in proc.stderr
    lines = record.read_text().splitlines()
    phases = [(_field(line, "PHASE"), _field(line, "DOMAIN")) for line in lines]
    assert ("start", doms[0].name) in phases and ("start", doms[1].name) in phases
    assert ("done", doms[0].name) in phases and ("done", doms[1].name) not in phases
    assert phases[-1][0] == "end"
    done = next(line for line in lines if _field(line, "PHASE") == "done")
    assert _field(done, "STATUS") == "ok" and _field(done, "LEVEL") == "full"
    assert _field(done, "POINT") == "virtnbdbackup.0" and int(_field(done, "BYTES")) > 0
    assert Path(_field(done, "LOG")).is_file()
    assert not (root / doms[1].name).exists()


def _field(line: str, name: str) -> str:
    for part in line.split():
        key, _, value = part.partition("=")
        if key == f"VIRTNBD_{name}":
            return value
    return ""


def test_backup_to_stdout_piped_into_restore_from_stdin(make_domain, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", 8 * MiB)])
    dom.disk("sda").write_data(MiB, 3 * MiB, seed=7)
    expected = dom.disk("sda").snapshot("full")
    out = tmp_path / "restored"
    backup = subprocess.Popen([sys.executable, BACKUP, "-d", dom.name, "-l", "full", "-o", "-", "-n",
                               "--scratchdir", str(dom.dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    restore = subprocess.run([sys.executable, RESTORE, "-i", "-", "-o", str(out), "--format", "raw", "-n"],
                             stdin=backup.stdout, capture_output=True, text=True, timeout=300, check=False)
    assert backup.stdout is not None and backup.stderr is not None
    backup.stdout.close()
    assert backup.wait(timeout=300) == 0, backup.stderr.read().decode()
    assert restore.returncode == 0, restore.stderr
    compare_images(out / "sda.raw", expected, fmt="raw")
    assert not list(dom.dir.glob("virtnbd-stdio.*"))


def test_killonly_without_a_job_says_so(make_domain) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", 4 * MiB)])
    proc = _run([sys.executable, BACKUP, "-d", dom.name, "-o", str(dom.dir / "unused"), "-k"])
    assert proc.returncode == 0, proc.stderr
    assert f"{dom.name}: no backup job running" in proc.stderr
    assert not (dom.dir / "unused").exists()
