"""SIGTERM / SIGKILL of ``virtnbdbackup -t qcow2 --push`` while QEMU's push job runs.

A push job on a small disk ends in milliseconds, so the test holds it in the middle: the inc has
448 MiB of (pattern) data to copy, about a second of QEMU's work here, while the test polls QEMU
every few milliseconds; as soon as the job appears it is throttled to 1 MiB/s with QMP
``block-job-set-speed`` (QEMU starts at most 64 MiB of copies before that applies), and the test
checks that QEMU still reports it running with bytes left before it sends the signal (a job that
ended first fails the test: it never passes without having killed a run mid-job).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.lab.images import compare_images
from tests.lab.libvirt_lab import DiskSpec, MiB, random_writes
from tests.system.backup_helpers import backup, backup_cmd, env, job_running, leftovers, ok

pytestmark = pytest.mark.system

SIZE = 512 * MiB
DIRTY = 448 * MiB
PUSH = ("-t", "qcow2", "--push")


def _qmp(dom: Any, command: str, **arguments: Any) -> Any:
    import libvirt_qemu
    msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
    answer = json.loads(libvirt_qemu.qemuMonitorCommand(dom.dom, json.dumps(msg), 0))
    if "return" not in answer:
        pytest.fail(f"QMP {command}: {answer.get('error')} (did the push job end before it was slowed?)")
    return answer["return"]


def _hold_job_mid_copy(dom: Any, proc: subprocess.Popen[str]) -> dict[str, Any]:
    """Wait for the backup job, slow it to 1 MiB/s, return QEMU's view of it (still running)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        jobs = [j for j in _qmp(dom, "query-block-jobs") if j["type"] == "backup"]
        if jobs:
            for job in jobs:
                _qmp(dom, "block-job-set-speed", device=job["device"], speed=MiB)
            job = [j for j in _qmp(dom, "query-block-jobs") if j["type"] == "backup"]
            if not job or job[0]["offset"] >= job[0]["len"]:
                pytest.fail(f"the push job ended before it could be slowed: {job}")
            return dict(job[0])
        if proc.poll() is not None:
            pytest.fail(f"backup ended before its job was seen: {proc.communicate()}")
    pytest.fail("no push job appeared in QEMU within 60 s")


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _points(folder: Path) -> list[str]:
    return [p["name"] for p in json.loads((folder / "virtnbd.manifest.json").read_text())["points"]]


def _wait_no_job(dom: Any, within: float = 30.0) -> bool:
    deadline = time.monotonic() + within
    while job_running(dom):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_push_inc_leaves_no_job_no_point_and_next_inc_exact(make_domain, sig) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    sda = dom.disk("sda")
    folder = dom.dir / "backup"
    sda.write_data(0, 2 * MiB, seed=1)
    ok(dom, "full", folder, *PUSH)
    p0 = sda.snapshot("p0")

    sda.write_pattern(8 * MiB, DIRTY, 0x3C)
    cmd = backup_cmd(dom, "inc", folder, *PUSH)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    try:
        held = _hold_job_mid_copy(dom, proc)
        assert held["status"] == "running" and held["offset"] < held["len"], held
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (128 + sig if sig == signal.SIGTERM else -sig), err
    assert _wait_no_job(dom), "a push job is still running in libvirt after the kill"
    assert _points(folder) == ["virtnbdbackup.0"], "a point was committed"
    assert not (folder / "sda.virtnbdbackup.1.qcow2").exists()
    if sig == signal.SIGTERM:
        assert "interrupted by signal SIGTERM" in err
        assert leftovers(folder, dom.dir) == []
        assert [c.getName() for c in dom.dom.listAllCheckpoints()] == ["virtnbdbackup.0"]
    else:
        assert "push guard: backup process gone: job aborted" in err, err

    sda.apply_all(random_writes(seed=3, n=20, size=SIZE))
    summary = ok(dom, "inc", folder, *PUSH)
    assert summary["point"] == "virtnbdbackup.1"
    assert not job_running(dom)
    assert leftovers(folder, dom.dir) == []
    assert sorted(c.getName() for c in dom.dom.listAllCheckpoints()) == ["virtnbdbackup.0", "virtnbdbackup.1"]
    compare_images(folder / "sda.virtnbdbackup.0.qcow2", p0, fmt="qcow2")
    compare_images(folder / "sda.virtnbdbackup.1.qcow2", sda.snapshot("p1"), fmt="qcow2")


def test_push_job_of_a_run_killed_with_its_guard_is_aborted_by_the_next_run(make_domain) -> None:  # type: ignore[no-untyped-def]
    """Last line of defence: the guard is SIGKILLed too (e.g. an OOM kill of both); the job is left
    running, and the next run tells it is ours and stale by its target folder's lock."""
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    sda = dom.disk("sda")
    folder = dom.dir / "backup"
    ok(dom, "full", folder, *PUSH)
    sda.write_pattern(8 * MiB, DIRTY, 0x3C)
    proc = subprocess.Popen(backup_cmd(dom, "inc", folder, *PUSH), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())
    try:
        _hold_job_mid_copy(dom, proc)
        guards = _children(proc.pid)
        assert guards, "no guard process"
        for pid in guards:
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert job_running(dom), "expected the job to be left behind when the guard dies too"
    sda.write_pattern(0, 1 * MiB, 0x77)
    res = backup(dom, "inc", folder, *PUSH)
    assert res.rc == 0, res.stderr
    assert "aborting stale push backup job of a killed run" in res.stderr, res.stderr
    assert _points(folder) == ["virtnbdbackup.0", "virtnbdbackup.1"]
    assert not job_running(dom)
    assert leftovers(folder, dom.dir) == []
    compare_images(folder / "sda.virtnbdbackup.1.qcow2", sda.snapshot("p1"), fmt="qcow2")
