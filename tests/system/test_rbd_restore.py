"""virtnbdrestore into RBD (synthetic backup sets, real test cluster): every point byte-exact, thin,
-o rbd:POOL naming, --overwrite, --rbd-snapshot, -c network-disk XML, and each error as one line."""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from lxml import etree

from tests.functional.restore_sets import SetBuilder
from tests.lab import ceph_lab
from virtnbd.cli.restore import main

pytestmark = [pytest.mark.system, pytest.mark.ceph]
MiB = 1 << 20


def ceph_args(c: ceph_lab.CephCluster) -> list[str]:
    return ["--ceph-conf", str(c.conf), "--ceph-id", c.client_id, "--ceph-keyring", str(c.keyring)]


def rbd_bytes(c: ceph_lab.CephCluster, pool: str, image: str, tmp: Path) -> bytes:
    dest = tmp / f"export-{uuid.uuid4().hex[:6]}.raw"
    c.rbd("export", "--no-progress", f"{pool}/{image}", str(dest))
    try:
        return dest.read_bytes()
    finally:
        dest.unlink()


def used(c: ceph_lab.CephCluster, pool: str, image: str) -> int:
    return int(json.loads(c.rbd("du", "--format", "json", f"{pool}/{image}"))["images"][0]["used_size"])


@pytest.fixture(scope="module")
def pool(ceph_cluster: ceph_lab.CephCluster) -> str:
    name = f"vnbdtest{uuid.uuid4().hex[:8]}"
    ceph_lab.create_pool(ceph_cluster, name)
    yield name
    ceph_cluster.ceph("osd", "pool", "rm", name, name, "--yes-i-really-really-mean-it")


@pytest.fixture(scope="module")
def chain_set(tmp_path_factory: pytest.TempPathFactory) -> SetBuilder:
    b = SetBuilder(str(tmp_path_factory.mktemp("rbdset") / "backup"), size=24 * MiB, cluster=64 << 10,
                   compression="zstd", seed=11)
    b.scribble(40)
    b.full()
    for _ in range(3):
        b.scribble(15, zero_share=0.3)
        b.inc()
    b.scribble(8)
    b.diff()
    return b


def shadow(b: SetBuilder, point: str) -> bytes:
    return Path(b.shadow_path(point)).read_bytes()


def test_every_point_byte_identical_and_thin(ceph_cluster, pool, chain_set, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for i, point in enumerate(chain_set.points):
        image = f"p{i}"
        # object size = backup cluster size, so `rbd du` (object granularity) can see every hole
        rc = main(["-i", chain_set.folder, "--target", f"rbd:{pool}/{image}", "--until", point, "-n",
                   "--rbd-object-size", "64K", *ceph_args(ceph_cluster)])
        assert rc == 0
        expected = shadow(chain_set, point)
        assert rbd_bytes(ceph_cluster, pool, image, tmp_path) == expected
        nonzero_clusters = sum(1 for pos in range(0, len(expected), 64 << 10) if any(expected[pos:pos + (64 << 10)]))
        assert used(ceph_cluster, pool, image) <= nonzero_clusters * (64 << 10) < chain_set.size
    names = json.loads(ceph_cluster.rbd("ls", "--format", "json", pool))
    assert not [n for n in names if n.endswith(".partial")]


def test_output_pool_names_images_after_disks_and_snapshot(ceph_cluster, chain_set, tmp_path,  # type: ignore[no-untyped-def]
                                                           monkeypatch) -> None:
    own = f"vnbdtest{uuid.uuid4().hex[:8]}"
    ceph_lab.create_pool(ceph_cluster, own)
    try:
        monkeypatch.chdir(tmp_path)
        point = chain_set.points[2]
        rc = main(["-i", chain_set.folder, "-o", f"rbd:{own}", "--until", point, "-n", "-c", "--rbd-snapshot",
                   "--rbd-object-size", "1M", "--rbd-features", "layering,exclusive-lock", *ceph_args(ceph_cluster)])
        assert rc == 0
        assert rbd_bytes(ceph_cluster, own, "sda", tmp_path) == shadow(chain_set, point)
        info = json.loads(ceph_cluster.rbd("info", "--format", "json", f"{own}/sda"))
        assert info["object_size"] == MiB and sorted(info["features"]) == ["exclusive-lock", "layering"]
        snaps = json.loads(ceph_cluster.rbd("snap", "ls", "--format", "json", f"{own}/sda"))
        assert [s["name"] for s in snaps] == [point]
        root = etree.parse(str(tmp_path / "restore_vnbdtest-set.xml")).getroot()
        disk = root.find("devices/disk")
        assert disk.get("type") == "network" and disk.find("driver").get("type") == "raw"
        source = disk.find("source")
        assert source.get("protocol") == "rbd" and source.get("name") == f"{own}/sda"
        assert [(h.get("name"), h.get("port")) for h in source.findall("host")] == [
            ("127.0.0.1", str(ceph_cluster.mon_port_v1))]
        assert source.find("auth").get("username") == "admin"
        assert source.find("auth/secret").get("usage") == "client.admin secret"
    finally:
        ceph_cluster.rbd("snap", "purge", f"{own}/sda")
        ceph_cluster.ceph("osd", "pool", "rm", own, own, "--yes-i-really-really-mean-it")


def test_existing_image_needs_overwrite(ceph_cluster, pool, chain_set, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    spec = f"rbd:{pool}/ow"
    args = ["-i", chain_set.folder, "--target", f"sda={spec}", "-n", *ceph_args(ceph_cluster)]
    assert main([*args, "--until", chain_set.points[3]]) == 0
    capsys.readouterr()
    assert main([*args, "--until", chain_set.points[0]]) == 1
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if "error" in ln]
    assert len(err) == 1 and "image exists already (use --overwrite" in err[0]
    assert rbd_bytes(ceph_cluster, pool, "ow", tmp_path) == shadow(chain_set, chain_set.points[3])
    # overwrite with an older point: newer data must be gone (zero ranges write_zeroes'd)
    assert main([*args, "--until", chain_set.points[0], "--overwrite"]) == 0
    assert rbd_bytes(ceph_cluster, pool, "ow", tmp_path) == shadow(chain_set, chain_set.points[0])


@pytest.mark.parametrize("case", ["pool", "key", "unreachable"])
def test_errors_are_one_line(ceph_cluster, chain_set, tmp_path, capsys, case) -> None:  # type: ignore[no-untyped-def]
    args = ceph_args(ceph_cluster)
    target = "rbd:nosuchpool/x" if case == "pool" else "rbd:rbd/vnbdtest-err"
    if case == "key":
        bad = tmp_path / "bad.keyring"
        bad.write_text("[client.admin]\n\tkey = AQBnCDRpAAAAABAAb0Pgb6X5GFJkW0mXn0XnOw==\n")
        args[-1] = str(bad)
    if case == "unreachable":
        conf = tmp_path / "dead.conf"
        conf.write_text(f"[global]\nmon host = v1:127.0.0.1:{ceph_lab._free_port()}\n")
        args[1] = str(conf)
        args += ["--ceph-timeout", "3"]
    rc = main(["-i", chain_set.folder, "--target", target, "-n", *args])
    lines = capsys.readouterr().err.strip().splitlines()
    errors_ = [ln for ln in lines if "error" in ln]
    assert rc == 1 and len(errors_) == 1, lines
    expect = {"pool": "pool 'nosuchpool' does not exist", "key": "permission denied for client.admin",
              "unreachable": "no answer from the cluster"}[case]
    assert expect in errors_[0]
    names = json.loads(ceph_cluster.rbd("ls", "--format", "json", "rbd"))
    assert "vnbdtest-err" not in names and "vnbdtest-err.partial" not in names


def test_target_usage_errors(chain_set, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["-i", chain_set.folder, "--target", "rbd:noimage"]) == 1
    assert "expected rbd:POOL/IMAGE" in capsys.readouterr().err
    assert main(["-i", chain_set.folder, "--target", "sdz=rbd:p/i", "-n"]) == 1
    assert "no disk sdz is restored" in capsys.readouterr().err
    assert main(["-i", chain_set.folder, "--target", "rbd:p/i", "--rbd-features", "bogus"]) == 1
    assert "unknown RBD feature" in capsys.readouterr().err
    assert os.path.isdir(chain_set.folder)


def test_real_domain_chain_restored_into_rbd_at_every_point(make_domain, ceph_cluster, pool, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A running qcow2 domain: full + incs with random writes, each point restored into RBD, byte-exact, thin."""
    from tests.lab.libvirt_lab import JOB_SAFE_KINDS, DiskSpec, compare_images, random_writes
    from tests.system.backup_helpers import ok

    size = 32 * MiB
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", size)])
    disk = dom.disk("sda")
    folder = tmp_path / "backup"
    expected: dict[str, Path] = {}
    for step, level in enumerate(["full", "inc", "inc", "inc"]):
        disk.apply_all(random_writes(seed=300 + step, n=10, size=size, kinds=JOB_SAFE_KINDS))
        point = ok(dom, level, folder)["point"]
        expected[point] = disk.snapshot(f"p{step}")
    for i, (point, image) in enumerate(expected.items()):
        name = f"dom{i}"
        assert main(["-i", str(folder), "--until", point, "--target", f"rbd:{pool}/{name}", "-n",
                     "--rbd-object-size", "64K", *ceph_args(ceph_cluster)]) == 0
        out = tmp_path / f"{name}.raw"
        ceph_cluster.rbd("export", "--no-progress", f"{pool}/{name}", str(out))
        compare_images(out, image, fmt="raw")
        data = out.read_bytes()
        nonzero = sum(1 for pos in range(0, size, 64 << 10) if any(data[pos:pos + (64 << 10)]))
        assert used(ceph_cluster, pool, name) <= nonzero * (64 << 10) < size      # thin: holes stay holes
        out.unlink()


def test_sigterm_during_restore_leaves_no_image(ceph_cluster, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM while writing: exit 143, the .partial image is removed, no image under the final name."""
    import signal
    import subprocess
    import sys
    import time

    import rados
    import rbd

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import bench_restore

    folder = tmp_path / "set"
    folder.mkdir()
    size, data = 512 * MiB, 320 * MiB
    content = bench_restore.Content()
    blocks = [(o, content.block(o, 0)) for o in range(0, data, MiB)]
    entry = bench_restore.write_stream(str(folder), "full", "virtnbdbackup.0", None, size=size, blocks=blocks)
    bench_restore.commit(str(folder), "full", "virtnbdbackup.0", None, entry)
    name = f"vnbdtest-{uuid.uuid4().hex[:8]}"
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, str(repo / "virtnbdrestore"), "-i", str(folder), "-n", "-w", "1",
                             "--target", f"rbd:rbd/{name}", *ceph_args(ceph_cluster)],
                            stderr=subprocess.PIPE, text=True)
    with rados.Rados(conffile=str(ceph_cluster.conf), rados_id=ceph_cluster.client_id) as cluster, \
            cluster.open_ioctx("rbd") as ioctx:
        deadline = time.monotonic() + 60
        while name + ".partial" not in rbd.RBD().list(ioctx) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "interrupted by signal SIGTERM" in err
        left = rbd.RBD().list(ioctx)
    assert name not in left and name + ".partial" not in left
