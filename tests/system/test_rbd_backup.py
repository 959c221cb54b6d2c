"""Back up a running domain whose disk is an RBD network disk (libvirt -> QEMU -> librbd -> test cluster).

full + incs with random writes in between; incs use RBD's change tracking (a snapshot per point,
diff_iterate from the previous one). Every point restored to qcow2 and to RBD, byte-exact.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.lab import ceph_lab
from tests.lab.libvirt_lab import JOB_SAFE_KINDS, DiskSpec, LabDomain, MiB, compare_images, random_writes
from tests.system.backup_helpers import backup, backup_cmd, env, must_read_blocks

pytestmark = [pytest.mark.system, pytest.mark.ceph]
SIZE = 32 * MiB


@dataclass
class RbdDomain:
    domain: LabDomain
    cluster: ceph_lab.CephCluster
    image: str


@pytest.fixture
def rbd_domain(make_domain, libvirt_conn, ceph_cluster) -> Iterator[RbdDomain]:  # type: ignore[no-untyped-def]
    image = f"vnbdtest-{uuid.uuid4().hex[:8]}"
    dom = make_domain(disks=[DiskSpec("sda", "sata", "raw", SIZE)], start=False)
    # 64K objects: RBD diffs (object granularity for new objects) then match the 64K-aligned test writes
    ceph_cluster.rbd("create", "--size", f"{SIZE // MiB}M", "--object-size", "64K", f"{ceph_cluster.pool}/{image}")
    try:
        with ceph_lab.libvirt_secret(libvirt_conn, ceph_cluster) as secret:
            xml = ceph_lab.swap_disk_to_rbd(libvirt_conn, dom.dom.XMLDesc(0), "sda",
                                            ceph_lab.rbd_disk_xml(ceph_cluster, image, "sda", secret))
            dom.dom = libvirt_conn.defineXML(xml)
            dom.start()
            yield RbdDomain(dom, ceph_cluster, image)
            dom.remove()
    finally:
        dom.remove()
        ceph_cluster.rbd("snap", "purge", f"{ceph_cluster.pool}/{image}")
        ceph_cluster.rbd("rm", "--no-progress", f"{ceph_cluster.pool}/{image}")


def ceph_args(c: ceph_lab.CephCluster) -> list[str]:
    return ["--ceph-conf", str(c.conf), "--ceph-id", c.client_id, "--ceph-keyring", str(c.keyring)]


def snaps(c: ceph_lab.CephCluster, image: str) -> list[str]:
    return [s["name"] for s in json.loads(c.rbd("snap", "ls", "--format", "json", f"{c.pool}/{image}"))]


def restore(folder: Path, point: str, *args: str) -> None:
    from virtnbd.cli.restore import main

    assert main(["-i", str(folder), "--until", point, "-n", *args]) == 0


def rbd_export(c: ceph_lab.CephCluster, pool: str, image: str, dest: Path) -> Path:
    c.rbd("export", "--no-progress", f"{pool}/{image}", str(dest))
    return dest


def touched(ops: list[Any]) -> int:
    return len({b for op in ops for b in range(op.offset // (64 << 10), op.end // (64 << 10))}) * (64 << 10)


def test_full_and_incs_of_rbd_disk_restore_exactly(rbd_domain: RbdDomain, tmp_path: Path) -> None:
    dom, c = rbd_domain.domain, rbd_domain.cluster
    disk = dom.disk("sda")
    folder = tmp_path / "backup"
    cargs = ceph_args(c)
    disk.apply_all(random_writes(seed=1, n=25, size=SIZE, kinds=JOB_SAFE_KINDS))
    res = backup(dom, "full", folder, *cargs)
    assert res.rc == 0, res.stderr
    assert res.summary is not None and res.summary["point"] == "virtnbdbackup.0"
    expected = {"virtnbdbackup.0": disk.snapshot("p0")}
    assert snaps(c, rbd_domain.image) == ["virtnbdbackup.0"]

    since_parent: list[Any] = []
    for step, level in enumerate(["inc", "inc", "diff", "inc"], start=1):
        ops = random_writes(seed=10 + step, n=12, size=SIZE, kinds=JOB_SAFE_KINDS)
        disk.apply_all(ops)
        since_parent += ops
        res = backup(dom, level, folder, *cargs)
        assert res.rc == 0, res.stderr
        assert res.summary is not None
        point = res.summary["point"]
        expected[point] = disk.snapshot(f"p{step}")
        read = res.summary["disks"]["sda"]["bytes_read"]
        # only what changed since the parent's RBD snapshot is read, not the whole disk
        assert must_read_blocks(since_parent) <= read <= touched(since_parent), (level, read)
        assert "backed up whole" not in res.stderr
        if level == "inc":
            since_parent = []
    assert snaps(c, rbd_domain.image) == ["virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2",
                                          "virtnbdbackup.3"]

    for i, (point, image) in enumerate(expected.items()):
        out = tmp_path / f"q{i}"
        restore(folder, point, "-o", str(out), "--format", "qcow2")
        compare_images(out / "sda.qcow2", image, fmt="qcow2")
        restore(folder, point, "--target", f"rbd:{c.pool}/{rbd_domain.image}-r{i}", *cargs)
        compare_images(rbd_export(c, c.pool, f"{rbd_domain.image}-r{i}", tmp_path / f"r{i}.raw"), image, fmt="raw")
        c.rbd("rm", "--no-progress", f"{c.pool}/{rbd_domain.image}-r{i}")

    # a full that fails after its snapshot was taken leaves the previous chain's snapshots alone (its own is
    # named virtnbdbackup.pending until the commit), and that chain goes on exactly
    for sig in (signal.SIGTERM, signal.SIGKILL):
        _failing_full(dom, tmp_path / f"failed-{sig.name}", cargs, sig)
        assert snaps(c, rbd_domain.image)[:4] == ["virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2",
                                                  "virtnbdbackup.3"]
    disk.apply_all(random_writes(seed=50, n=6, size=SIZE, kinds=JOB_SAFE_KINDS))
    res = backup(dom, "inc", folder, *cargs)            # also removes the killed full's pending snapshot
    assert res.rc == 0 and "of a full that never committed" in res.stderr, res.stderr
    assert snaps(c, rbd_domain.image)[-1] == "virtnbdbackup.4" and "virtnbdbackup.pending" not in \
        snaps(c, rbd_domain.image)
    restore(folder, "virtnbdbackup.4", "-o", str(tmp_path / "cont"), "--format", "raw")
    compare_images(tmp_path / "cont" / "sda.raw", disk.snapshot("p5"), fmt="raw")

    # a new chain removes the old snapshots and starts again at virtnbdbackup.0; without any
    # --ceph-* option (and no /etc/ceph/ceph.conf here) the disk's <host>s and libvirt secret are used
    assert not Path("/etc/ceph/ceph.conf").exists()
    res = backup(dom, "full", tmp_path / "backup2")
    assert res.rc == 0, res.stderr
    assert snaps(c, rbd_domain.image) == ["virtnbdbackup.0"]
    disk.apply_all(random_writes(seed=99, n=6, size=SIZE, kinds=JOB_SAFE_KINDS))
    res = backup(dom, "inc", tmp_path / "backup2")
    assert res.rc == 0, res.stderr
    assert snaps(c, rbd_domain.image) == ["virtnbdbackup.0", "virtnbdbackup.1"]
    assert "stderr" not in res.stderr and "msgr" not in res.stderr      # no librados noise
    out = tmp_path / "last"
    restore(tmp_path / "backup2", "virtnbdbackup.1", "-o", str(out), "--format", "raw")
    compare_images(out / "sda.raw", disk.snapshot("last"), fmt="raw")


def _failing_full(dom: LabDomain, folder: Path, cargs: list[str], sig: signal.Signals) -> None:
    """A full into ``folder`` stopped by ``sig`` once its job began copying (first data file appeared)."""
    proc = subprocess.Popen(backup_cmd(dom, "full", folder, *cargs), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env())
    deadline = time.monotonic() + 60
    while not list(folder.glob("*.partial")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGSTOP)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, sig)
    os.kill(proc.pid, signal.SIGCONT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and not (folder / "virtnbd.manifest.json").exists(), err
    assert "Traceback" not in err, err       # a SIGKILLed run's job and snapshot are left to the next run


def test_missing_parent_snapshot_is_a_clear_error(rbd_domain: RbdDomain, tmp_path: Path) -> None:
    dom, c = rbd_domain.domain, rbd_domain.cluster
    folder = tmp_path / "backup"
    # no way to the cluster: one clear line, nothing committed
    res = backup(dom, "full", folder, "--ceph-conf", str(tmp_path / "missing.conf"))
    assert res.rc == 1 and "RBD snapshots that track changes need the cluster" in res.stderr
    assert not (folder / "virtnbd.manifest.json").exists()
    assert snaps(c, rbd_domain.image) == []
    assert backup(dom, "full", folder, *ceph_args(c)).rc == 0
    c.rbd("snap", "rm", "--no-progress", f"{c.pool}/{rbd_domain.image}@virtnbdbackup.0")
    res = backup(dom, "inc", folder, *ceph_args(c))
    assert res.rc == 1
    assert "RBD snapshot virtnbdbackup.0" in res.stderr and "is missing" in res.stderr
    assert snaps(c, rbd_domain.image) == []          # the failed inc took no snapshot that stays


def test_restored_domain_runs_on_its_rbd_image(rbd_domain: RbdDomain, libvirt_conn: Any, tmp_path: Path) -> None:
    """-D with an RBD target: libvirt accepts the network disk (original <auth> kept) and QEMU opens the image."""
    import libvirt
    from lxml import etree

    dom, c = rbd_domain.domain, rbd_domain.cluster
    dom.disk("sda").apply_all(random_writes(seed=7, n=8, size=SIZE, kinds=JOB_SAFE_KINDS))
    folder = tmp_path / "backup"
    assert backup(dom, "full", folder, *ceph_args(c)).rc == 0
    name = f"vnbdtest-r{uuid.uuid4().hex[:8]}"
    image = f"{rbd_domain.image}-def"
    restore(folder, "virtnbdbackup.0", "-o", str(tmp_path / "out"), "--target", f"rbd:{c.pool}/{image}",
            "-D", "-N", name, *ceph_args(c))
    compare_images(rbd_export(c, c.pool, image, tmp_path / "restored.raw"), dom.disk("sda").shadow, fmt="raw")
    new = libvirt_conn.lookupByName(name)
    try:
        disk = etree.fromstring(new.XMLDesc(0).encode()).find("devices/disk")
        assert disk.get("type") == "network"
        source = disk.find("source")
        assert source.get("protocol") == "rbd" and source.get("name") == f"{c.pool}/{image}"
        original = etree.fromstring(dom.dom.XMLDesc(0).encode()).find("devices/disk/auth/secret")
        assert disk.find(".//auth/secret").get("uuid") == original.get("uuid")
        new.create()
        status = json.loads(c.rbd("status", "--format", "json", f"{c.pool}/{image}"))
        assert len(status["watchers"]) == 1            # QEMU of the restored domain has the image open
        new.destroy()
    finally:
        if new.isActive():
            new.destroy()
        new.undefineFlags(getattr(libvirt, "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 0))
        c.rbd("rm", "--no-progress", f"{c.pool}/{image}")


def test_mixed_domain_qcow2_bitmap_and_rbd_diff(make_domain, libvirt_conn, ceph_cluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """sda qcow2 file (libvirt checkpoint bitmap) + sdb raw RBD (snapshots + diff) in one chain."""
    c = ceph_cluster
    image = f"vnbdtest-{uuid.uuid4().hex[:8]}"
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE), DiskSpec("sdb", "sata", "raw", SIZE)],
                      start=False)
    c.rbd("create", "--size", f"{SIZE // MiB}M", "--object-size", "64K", f"{c.pool}/{image}")
    try:
        with ceph_lab.libvirt_secret(libvirt_conn, c) as secret:
            xml = ceph_lab.swap_disk_to_rbd(libvirt_conn, dom.dom.XMLDesc(0), "sdb",
                                            ceph_lab.rbd_disk_xml(c, image, "sdb", secret))
            dom.dom = libvirt_conn.defineXML(xml)
            dom.start()
            folder = tmp_path / "backup"
            expected: dict[str, dict[str, Path]] = {}
            for step, level in enumerate(["full", "inc", "inc"]):
                for n, target in enumerate(("sda", "sdb")):
                    dom.disk(target).apply_all(random_writes(seed=50 + 10 * step + n, n=8, size=SIZE,
                                                             kinds=JOB_SAFE_KINDS))
                res = backup(dom, level, folder, *ceph_args(c))
                assert res.rc == 0, res.stderr
                assert res.summary is not None
                expected[res.summary["point"]] = {t: dom.disk(t).snapshot(f"{t}{step}") for t in ("sda", "sdb")}
                assert "backed up whole" not in res.stderr
            manifest = json.loads((folder / "virtnbd.manifest.json").read_text())
            modes = [{d: e["extra"]["mode"] for d, e in p["disks"].items()} for p in manifest["points"]]
            assert modes == [{"sda": "full", "sdb": "full"}, {"sda": "inc", "sdb": "rbd"}, {"sda": "inc", "sdb": "rbd"}]
            assert snaps(c, image) == ["virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2"]
            for i, (point, images) in enumerate(expected.items()):
                out = tmp_path / f"r{i}"
                restore(folder, point, "-o", str(out), "--format", "raw")
                for target, want in images.items():
                    compare_images(out / f"{target}.raw", want, fmt="raw")
            dom.remove()
    finally:
        dom.remove()
        c.rbd("snap", "purge", f"{c.pool}/{image}")
        c.rbd("rm", "--no-progress", f"{c.pool}/{image}")
