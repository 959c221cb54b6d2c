"""SIGTERM / SIGKILL of ``virtnbdbackup -t qcow2 --push`` while QEMU's push job runs.

A push job on a small disk ends in milliseconds, so the test holds it in the middle: the inc has
448 MiB of (pattern) data to copy, about a second of QEMU's work here, while the test polls QEMU
every few milliseconds; as soon as the job appears it is throttled to 1 MiB/s with QMP
``block-job-set-speed`` (QEMU starts at most 64 MiB of copies before that applies), and the test
checks that QEMU still reports it running with bytes left before it sends the signal. On a busy
host a job may end before it is slowed: that inc must succeed, and the test tries again (three
times at most; it never passes without having killed a run mid-job).
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
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


def _qmp_answer(dom: Any, command: str, **arguments: Any) -> dict[str, Any]:
    import libvirt_qemu
    msg = {"execute": command, **({"arguments": arguments} if arguments else {})}
    return dict(json.loads(libvirt_qemu.qemuMonitorCommand(dom.dom, json.dumps(msg), 0)))


def _qmp(dom: Any, command: str, **arguments: Any) -> Any:
    answer = _qmp_answer(dom, command, **arguments)
    if "return" not in answer:
        pytest.fail(f"QMP {command}: {answer.get('error')}")
    return answer["return"]


def _try_hold(dom: Any, proc: subprocess.Popen[str]) -> dict[str, Any] | None:
    """Wait for the backup job, slow it to 1 MiB/s, return QEMU's view of it (still running);
    None when the job ended before it could be slowed (a busy host: the caller tries again)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        jobs = [j for j in _qmp(dom, "query-block-jobs") if j["type"] == "backup"]
        if jobs:
            for job in jobs:
                if "return" not in _qmp_answer(dom, "block-job-set-speed", device=job["device"], speed=MiB):
                    return None
            job = [j for j in _qmp(dom, "query-block-jobs") if j["type"] == "backup"]
            return dict(job[0]) if job and job[0]["offset"] < job[0]["len"] else None
        if proc.poll() is not None:
            pytest.fail(f"backup ended before its job was seen: {proc.communicate()}")
    pytest.fail("no push job appeared in QEMU within 60 s")


@contextlib.contextmanager
def _slowed_qemu(dom: Any) -> Iterator[None]:
    """QEMU runs 10 ms of every 50 (SIGSTOP/SIGCONT) until the job is slowed: on a busy host the
    448 MiB copy could otherwise end between the job's start and the test's first QMP command."""
    pid = int(Path(f"/run/libvirt/qemu/{dom.name}.pid").read_text().strip())
    done = threading.Event()

    def cycle() -> None:
        while not done.is_set():
            os.kill(pid, signal.SIGSTOP)
            done.wait(0.04)
            os.kill(pid, signal.SIGCONT)
            done.wait(0.01)

    worker = threading.Thread(target=cycle, daemon=True)
    worker.start()
    try:
        yield
    finally:
        done.set()
        worker.join()
        os.kill(pid, signal.SIGCONT)


def _held_inc(dom: Any, folder: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """A push inc with 448 MiB to copy, held mid-job. An attempt whose job ended before it was
    slowed is let finish (it must succeed: one more point) and the next one tries again."""
    for attempt in range(3):
        dom.disk("sda").write_pattern(8 * MiB, DIRTY, 0x3C + attempt)
        proc = subprocess.Popen(backup_cmd(dom, "inc", folder, *PUSH), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env())
        try:
            with _slowed_qemu(dom):
                held = _try_hold(dom, proc)
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
        if held is not None:
            return proc, held
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    pytest.fail("the push job ended before it could be slowed, three times")


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

    proc, held = _held_inc(dom, folder)
    committed = _points(folder)
    killed = f"virtnbdbackup.{len(committed)}"
    try:
        assert held["status"] == "running" and held["offset"] < held["len"], held
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (128 + sig if sig == signal.SIGTERM else -sig), err
    assert _wait_no_job(dom), "a push job is still running in libvirt after the kill"
    assert _points(folder) == committed, "a point was committed"
    assert not (folder / f"sda.{killed}.qcow2").exists()
    if sig == signal.SIGTERM:
        assert "interrupted by signal SIGTERM" in err
        assert leftovers(folder, dom.dir) == []
        assert sorted(c.getName() for c in dom.dom.listAllCheckpoints()) == committed
    else:
        assert "push guard: backup process gone: job aborted" in err, err

    sda.apply_all(random_writes(seed=3, n=20, size=SIZE))
    summary = ok(dom, "inc", folder, *PUSH)
    assert summary["point"] == killed
    assert not job_running(dom)
    assert leftovers(folder, dom.dir) == []
    assert sorted(c.getName() for c in dom.dom.listAllCheckpoints()) == [*committed, killed]
    compare_images(folder / "sda.virtnbdbackup.0.qcow2", p0, fmt="qcow2")
    compare_images(folder / f"sda.{killed}.qcow2", sda.snapshot("p1"), fmt="qcow2")


def test_push_job_of_a_run_killed_with_its_guard_is_aborted_by_the_next_run(make_domain) -> None:  # type: ignore[no-untyped-def]
    """Last line of defence: the guard is SIGKILLed too (e.g. an OOM kill of both); the job is left
    running, and the next run tells it is ours and stale by its target folder's lock."""
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    sda = dom.disk("sda")
    folder = dom.dir / "backup"
    ok(dom, "full", folder, *PUSH)
    proc, _held = _held_inc(dom, folder)
    committed = _points(folder)
    killed = f"virtnbdbackup.{len(committed)}"
    try:
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
    assert _points(folder) == [*committed, killed]
    assert not job_running(dom)
    assert leftovers(folder, dom.dir) == []
    compare_images(folder / f"sda.{killed}.qcow2", sda.snapshot("p1"), fmt="qcow2")
