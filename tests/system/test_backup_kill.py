"""A backup killed in the middle of a disk leaves no job, no point, and the next inc is exact."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest

from tests.lab.libvirt_lab import JOB_SAFE_KINDS, DiskSpec, MiB, random_writes
from tests.system.backup_helpers import backup_cmd, check_point, env, job_running, leftovers, ok

pytestmark = pytest.mark.system

SIZE = 64 * MiB


def _points(folder) -> list[str]:  # type: ignore[no-untyped-def]
    return [p["name"] for p in json.loads((folder / "virtnbd.manifest.json").read_text())["points"]]


def _kill_mid_disk(cmd: list[str], folder, sig: int) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    """Start the backup, wait until a data file is partly written, send ``sig``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            partial = [p for p in folder.glob("*.partial") if p.stat().st_size > 256 * 1024]
            if partial:
                break
            if proc.poll() is not None:
                pytest.fail(f"backup ended before it could be killed: {proc.communicate()}")
            time.sleep(0.01)
        else:
            pytest.fail("no partial data file appeared")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_inc_then_next_inc_exact(make_domain, tmp_path, sig) -> None:  # type: ignore[no-untyped-def]
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    sda = dom.disk("sda")
    folder = dom.dir / "backup"
    sda.write_data(0, 4 * MiB, seed=1)
    ok(dom, "full", folder)
    expected = {"virtnbdbackup.0": {"sda": sda.snapshot("p0")}}

    # lots of changed data, compressed slowly, so there is a moment "in the middle of the disk"
    sda.write_data(8 * MiB, 48 * MiB, seed=2)
    cmd = backup_cmd(dom, "inc", folder, "-z", "19", "--compress-method", "zstd", "--read-size", "256K")
    done = _kill_mid_disk(cmd, folder, sig)
    assert done.returncode == (128 + sig if sig == signal.SIGTERM else -sig), done.stderr
    assert _points(folder) == ["virtnbdbackup.0"]
    if sig == signal.SIGTERM:
        assert "interrupted by signal SIGTERM" in done.stderr
        assert not job_running(dom), "SIGTERM left the backup job running"
        assert leftovers(folder, dom.dir) == []
        assert [c.getName() for c in dom.dom.listAllCheckpoints()] == ["virtnbdbackup.0"]
    else:
        assert job_running(dom), "expected the killed run's job to be left behind"

    # more changes, then the next inc: covers everything since virtnbdbackup.0
    sda.apply_all(random_writes(seed=3, n=20, size=SIZE, kinds=JOB_SAFE_KINDS))  # a stale job may still run
    summary = ok(dom, "inc", folder)
    assert summary["point"] == "virtnbdbackup.1"
    assert not job_running(dom)
    assert leftovers(folder, dom.dir) == []
    expected["virtnbdbackup.1"] = {"sda": sda.snapshot("p1")}
    for point, images in expected.items():
        check_point(dom, folder, point, images, tmp_path)
