"""The Ceph test lab itself: the session cluster serves RBD I/O; a cluster stops cleanly."""
from __future__ import annotations

import os
import uuid

import pytest

from tests.lab import ceph_lab

pytestmark = [pytest.mark.system, pytest.mark.ceph]


def test_rbd_write_read_thin(ceph_cluster: ceph_lab.CephCluster) -> None:
    import rados
    import rbd

    name = f"vnbdtest-{uuid.uuid4().hex[:8]}"
    payload = os.urandom(1 << 20)
    with rados.Rados(conffile=str(ceph_cluster.conf), rados_id=ceph_cluster.client_id) as cluster:
        with cluster.open_ioctx(ceph_cluster.pool) as ioctx:
            rbd.RBD().create(ioctx, name, 64 << 20)
            try:
                with rbd.Image(ioctx, name) as image:
                    image.write(payload, 16 << 20)
                    image.flush()
                with rbd.Image(ioctx, name, read_only=True) as image:
                    assert image.read(16 << 20, len(payload)) == payload
                    assert image.read(0, 4096) == bytes(4096)
                du = ceph_cluster.rbd("du", "--format", "json", f"{ceph_cluster.pool}/{name}")
                import json

                used = json.loads(du)["images"][0]["used_size"]
                assert 0 < used <= 4 << 20      # one 4 MiB object of 16
            finally:
                rbd.RBD().remove(ioctx, name)


def test_cluster_stops_exactly_its_daemons(tmp_path) -> None:  # type: ignore[no-untyped-def]
    if not ceph_lab.available():
        pytest.skip("Ceph daemons not installed")
    folder = tmp_path / "c"
    with ceph_lab.running_cluster(memstore_bytes=64 << 20, folder=str(folder)) as cluster:
        pids = ceph_lab.running(cluster.folder)
        assert len(pids) == 3
        assert "HEALTH" in cluster.ceph("health")
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or not ceph_lab._is_ours(pid, folder.resolve())
    assert not folder.exists()


def test_orphaned_cluster_of_a_dead_session_is_reaped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    if not ceph_lab.available():
        pytest.skip("Ceph daemons not installed")
    folder = tmp_path / f"{ceph_lab.TEMP_PREFIX}orphan"
    cluster = ceph_lab.start(folder, memstore_bytes=64 << 20)
    pids = ceph_lab.running(cluster.folder)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (folder / ceph_lab.OWNER_FILE).write_text(f"{dead.pid}\n")
    try:
        assert ceph_lab.reap_orphans(str(tmp_path)) == [folder]
    finally:
        ceph_lab.stop(folder)
    assert not folder.exists()
    assert all(not ceph_lab._is_ours(pid, folder.resolve()) for pid in pids)
