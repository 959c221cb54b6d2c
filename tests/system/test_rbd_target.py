"""The RBD restore target against the real test cluster: bytes, thinness, temp name, every error."""
from __future__ import annotations

import json
import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.lab import ceph_lab
from virtnbd import errors, rbdconn
from virtnbd.restore.targets import TargetRequest, open_target
from virtnbd.restore.targets.rbd import RbdOptions

pytestmark = [pytest.mark.system, pytest.mark.ceph]

MiB = 1 << 20


def ceph_options(c: ceph_lab.CephCluster, **kw: object) -> rbdconn.CephOptions:
    base: dict[str, object] = {"conf": str(c.conf), "client_id": c.client_id, "keyring": str(c.keyring)}
    base.update(kw)
    return rbdconn.CephOptions(**base)  # type: ignore[arg-type]


def request(c: ceph_lab.CephCluster, image: str, size: int, pool: str | None = None, point: str = "p1",
            **kw: object) -> TargetRequest:
    ceph = kw.pop("ceph", None) or ceph_options(c)
    return TargetRequest(spec=f"rbd:{pool or c.pool}/{image}", format="raw", virtual_size=size,
                         extra={"rbd": RbdOptions(ceph=ceph, **kw), "point": point})  # type: ignore[arg-type]


@pytest.fixture
def image_name(ceph_cluster: ceph_lab.CephCluster) -> Iterator[str]:
    name = f"vnbdtest-{uuid.uuid4().hex[:8]}"
    yield name
    for leftover in (name, name + ".partial"):
        try:
            ceph_cluster.rbd("snap", "purge", f"{ceph_cluster.pool}/{leftover}")
            ceph_cluster.rbd("rm", "--no-progress", f"{ceph_cluster.pool}/{leftover}")
        except ceph_lab.CephLabError:
            pass


def images(c: ceph_lab.CephCluster) -> list[str]:
    return json.loads(c.rbd("ls", "--format", "json", c.pool))


def export(c: ceph_lab.CephCluster, image: str, dest: Path) -> bytes:
    c.rbd("export", "--no-progress", f"{c.pool}/{image}", str(dest))
    return dest.read_bytes()


def used_bytes(c: ceph_lab.CephCluster, image: str) -> int:
    return int(json.loads(c.rbd("du", "--format", "json", f"{c.pool}/{image}"))["images"][0]["used_size"])


def apply_pattern(target, size: int, seed: int) -> bytes:  # type: ignore[no-untyped-def]
    """Write random data extents (some unaligned), zero the rest; return the expected image."""
    rng = random.Random(seed)
    expected = bytearray(size)
    pos = 0
    while pos < size:
        length = min(size - pos, rng.choice([4096, 65536, 3 * MiB + 512, 5 * MiB, 12288]))
        if rng.random() < 0.4:
            data = rng.randbytes(length)
            target.write(pos, data)
            expected[pos:pos + length] = data
        else:
            target.zero(pos, length)
        pos += length
    return bytes(expected)


def test_new_image_bytes_thin_and_renamed(ceph_cluster: ceph_lab.CephCluster, image_name: str, tmp_path: Path) -> None:
    size = 48 * MiB
    with open_target(request(ceph_cluster, image_name, size)) as target:
        expected = apply_pattern(target, size, seed=1)
        assert image_name + ".partial" in images(ceph_cluster)
        assert image_name not in images(ceph_cluster)
        target.commit()
    assert image_name in images(ceph_cluster) and image_name + ".partial" not in images(ceph_cluster)
    assert export(ceph_cluster, image_name, tmp_path / "out.raw") == expected
    assert used_bytes(ceph_cluster, image_name) < size      # zero ranges were never written


def test_sparse_image_stays_thin(ceph_cluster: ceph_lab.CephCluster, image_name: str, tmp_path: Path) -> None:
    size = 64 * MiB
    payload = os.urandom(MiB)
    with open_target(request(ceph_cluster, image_name, size)) as target:
        target.zero(0, 40 * MiB)
        target.write(40 * MiB, payload)
        target.zero(41 * MiB, size - 41 * MiB)
        target.commit()
    assert used_bytes(ceph_cluster, image_name) <= 4 * MiB          # one object of 16
    out = export(ceph_cluster, image_name, tmp_path / "o.raw")
    assert out == bytes(40 * MiB) + payload + bytes(size - 41 * MiB)


def test_features_object_size_and_snapshot(ceph_cluster: ceph_lab.CephCluster, image_name: str) -> None:
    with open_target(request(ceph_cluster, image_name, 8 * MiB, features=("layering",), object_size=MiB,
                             snapshot=True, point="virtnbdbackup.3")) as target:
        target.write(0, b"x" * 4096)
        target.commit()
    info = json.loads(ceph_cluster.rbd("info", "--format", "json", f"{ceph_cluster.pool}/{image_name}"))
    assert info["features"] == ["layering"] and info["object_size"] == MiB and info["size"] == 8 * MiB
    snaps = json.loads(ceph_cluster.rbd("snap", "ls", "--format", "json", f"{ceph_cluster.pool}/{image_name}"))
    assert [s["name"] for s in snaps] == ["virtnbdbackup.3"]


def test_overwrite_existing_discards_old_data(ceph_cluster: ceph_lab.CephCluster, image_name: str,
                                              tmp_path: Path) -> None:
    with open_target(request(ceph_cluster, image_name, 32 * MiB)) as target:
        target.write(0, os.urandom(32 * MiB))
        target.commit()
    with pytest.raises(errors.CephError, match="exists already .*--overwrite"):
        open_target(request(ceph_cluster, image_name, 16 * MiB))
    with open_target(request(ceph_cluster, image_name, 16 * MiB, overwrite=True)) as target:
        expected = apply_pattern(target, 16 * MiB, seed=2)
        target.commit()
    assert export(ceph_cluster, image_name, tmp_path / "o.raw") == expected   # shrunk to 16 MiB, old bytes gone


def test_abort_leaves_nothing(ceph_cluster: ceph_lab.CephCluster, image_name: str) -> None:
    with pytest.raises(RuntimeError), open_target(request(ceph_cluster, image_name, 8 * MiB)) as target:
        target.write(0, b"y" * 65536)
        raise RuntimeError("boom")
    assert image_name not in images(ceph_cluster) and image_name + ".partial" not in images(ceph_cluster)


def test_missing_pool(ceph_cluster: ceph_lab.CephCluster, image_name: str) -> None:
    with pytest.raises(errors.CephError, match="pool 'nosuchpool' does not exist"):
        open_target(request(ceph_cluster, image_name, MiB, pool="nosuchpool"))


def test_wrong_key(ceph_cluster: ceph_lab.CephCluster, image_name: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.keyring"
    bad.write_text(f"[client.{ceph_cluster.client_id}]\n\tkey = AQBnCDRpAAAAABAAb0Pgb6X5GFJkW0mXn0XnOw==\n")
    with pytest.raises(errors.CephError, match="permission denied for client.admin"):
        open_target(request(ceph_cluster, image_name, MiB, ceph=ceph_options(ceph_cluster, keyring=str(bad))))
    assert image_name + ".partial" not in images(ceph_cluster)


def test_unreachable_cluster_times_out(ceph_cluster: ceph_lab.CephCluster, image_name: str, tmp_path: Path) -> None:
    conf = tmp_path / "dead.conf"
    port = ceph_lab._free_port()          # nothing listens there
    conf.write_text(f"[global]\nmon host = v1:127.0.0.1:{port}\n")
    with pytest.raises(errors.CephError, match="no answer from the cluster"):
        open_target(request(ceph_cluster, image_name, MiB, ceph=ceph_options(ceph_cluster, conf=str(conf),
                                                                                connect_timeout=3)))


def test_missing_conf_and_keyring(ceph_cluster: ceph_lab.CephCluster, image_name: str, tmp_path: Path) -> None:
    with pytest.raises(errors.CephError, match="cannot read Ceph config"):
        open_target(request(ceph_cluster, image_name, MiB, ceph=ceph_options(ceph_cluster, conf=str(tmp_path / "x"))))
    with pytest.raises(errors.CephError, match="cannot read keyring"):
        open_target(request(ceph_cluster, image_name, MiB,
                            ceph=ceph_options(ceph_cluster, keyring=str(tmp_path / "x"))))


def test_overwrite_refuses_an_image_in_use(ceph_cluster: ceph_lab.CephCluster, image_name: str) -> None:
    import rados
    import rbd

    with open_target(request(ceph_cluster, image_name, 4 * MiB)) as target:
        target.write(0, b"z" * 4096)
        target.commit()
    with rados.Rados(conffile=str(ceph_cluster.conf), rados_id=ceph_cluster.client_id) as cluster, \
            cluster.open_ioctx(ceph_cluster.pool) as ioctx, rbd.Image(ioctx, image_name):   # a watcher, like QEMU
        with pytest.raises(errors.CephError, match="in use"):
            open_target(request(ceph_cluster, image_name, 4 * MiB, overwrite=True))
    assert image_name in images(ceph_cluster) and image_name + ".partial" not in images(ceph_cluster)


def test_leftover_partial_of_a_killed_run_is_replaced(ceph_cluster: ceph_lab.CephCluster, image_name: str,
                                                      tmp_path: Path) -> None:
    # what a SIGKILLed restore leaves: IMAGE.partial with some data, no IMAGE
    ceph_cluster.rbd("create", "--size", "4M", f"{ceph_cluster.pool}/{image_name}.partial")
    with open_target(request(ceph_cluster, image_name, 8 * MiB)) as target:
        target.write(MiB, b"n" * 4096)
        target.commit()
    assert export(ceph_cluster, image_name, tmp_path / "o.raw") == bytes(MiB) + b"n" * 4096 + bytes(7 * MiB - 4096)
    assert image_name + ".partial" not in images(ceph_cluster)


def test_overwrite_with_existing_snapshot_name_is_refused(ceph_cluster: ceph_lab.CephCluster,
                                                          image_name: str) -> None:
    with open_target(request(ceph_cluster, image_name, 4 * MiB, snapshot=True, point="virtnbdbackup.1")) as target:
        target.write(0, b"a" * 4096)
        target.commit()
    with pytest.raises(errors.CephError, match="snapshot virtnbdbackup.1 exists already"):
        open_target(request(ceph_cluster, image_name, 4 * MiB, overwrite=True, snapshot=True,
                            point="virtnbdbackup.1"))
    assert image_name in images(ceph_cluster) and image_name + ".partial" not in images(ceph_cluster)
