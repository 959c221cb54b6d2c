"""Backup sets in a real RADOS Gateway bucket: restore, dump and verify read them with ranged GETs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.functional.restore_sets import SetBuilder, compare
from tests.functional.test_map import Mapped, copy_and_compare, random_reads
from tests.lab import rgw_lab
from virtnbd.backupset.s3store import ObjectStore
from virtnbd.cli.prune import main as prune_main
from virtnbd.cli.restore import main

pytestmark = [pytest.mark.system, pytest.mark.ceph]


def _upload_set(folder: str, store: ObjectStore) -> None:
    """Copy a local set object by object, the manifest last (as a backup commits)."""
    names = sorted(n for n in os.listdir(folder) if not n.startswith("shadow."))
    for name in sorted(names, key=lambda n: n == "virtnbd.manifest.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as src, store.create(name) as dst:
                while chunk := src.read(3 << 20):
                    dst.write(chunk)


@pytest.fixture()
def s3_set(s3_endpoint: rgw_lab.S3Endpoint, s3_bucket: str, tmp_path, monkeypatch: pytest.MonkeyPatch):
    for key, value in s3_endpoint.env().items():
        monkeypatch.setenv(key, value)
    b = SetBuilder(str(tmp_path / "local"), size=24 << 20, compression="lz4")
    b.scribble(150)
    b.full()
    for _ in range(3):
        b.scribble(30)
        b.inc()
    url = f"s3://{s3_bucket}/vm1"
    _upload_set(b.folder, ObjectStore(url))
    return b, url


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_every_point_restores_exact_from_the_bucket(s3_set, tmp_path, fmt) -> None:
    b, url = s3_set
    for point in b.points:
        out = str(tmp_path / f"{fmt}-{point}")
        assert main(["-i", url, "-o", out, "-n", "--until", point, "--format", fmt]) == 0
        compare(os.path.join(out, f"sda.{fmt}"), fmt, b.shadow_path(point))


def test_dump_and_verify_against_the_bucket(s3_set, capsys) -> None:
    _b, url = s3_set
    assert main(["-i", url, "-a", "dump"]) == 0
    assert "virtnbdbackup.3" in capsys.readouterr().out
    assert main(["-i", url, "-a", "verify"]) == 0


def test_flipped_byte_in_an_object_is_named_and_restore_refuses(s3_set, tmp_path, capsys) -> None:
    b, url = s3_set
    store = ObjectStore(url)
    name = "sda.inc.virtnbdbackup.2.data"
    data = bytearray(store.get(name))
    data[len(data) // 3] ^= 0x40
    store.put(name, bytes(data))
    assert main(["-i", url, "-a", "verify"]) != 0
    assert name in capsys.readouterr().err
    out = str(tmp_path / "out")
    assert main(["-i", url, "-o", out, "-n"]) != 0
    assert not os.path.exists(os.path.join(out, "sda.qcow2"))


def test_map_serves_every_point_from_the_bucket(s3_set, tmp_path) -> None:
    b, url = s3_set
    for n, point in enumerate(b.points):
        with Mapped(url, "--until", point) as mapped:
            assert mapped.info["set"] == url
            copy_and_compare(mapped, Path(b.shadow_path(point)), tmp_path)
            random_reads(mapped, Path(b.shadow_path(point)).read_bytes(), n)


def test_consolidate_and_prune_in_the_bucket(s3_set, tmp_path) -> None:
    b, url = s3_set
    store = ObjectStore(url)
    assert prune_main(["-i", url, "--consolidate", b.points[2]]) == 0
    names = store.list()
    assert "sda.inc.virtnbdbackup.1.data" not in names and ".virtnbd.prune.journal" not in names
    assert any(n.startswith("prune.") and n.endswith(".log") for n in names), names
    for point in b.points[2:]:
        out = str(tmp_path / f"c-{point}")
        assert main(["-i", url, "-o", out, "-n", "--until", point, "--format", "raw"]) == 0
        compare(os.path.join(out, "sda.raw"), "raw", b.shadow_path(point))
    assert prune_main(["-i", url, "--keep-last", "1"]) == 0
    out = str(tmp_path / "last")
    assert main(["-i", url, "-o", out, "-n", "--format", "raw"]) == 0
    compare(os.path.join(out, "sda.raw"), "raw", b.shadow_path(b.points[-1]))
