"""virtnbdbackup -o s3://: a real domain backed up into a real RADOS Gateway bucket, proved by bytes.

Every point restores byte-identical from the bucket; a SIGKILLed run commits
nothing and the next run aborts its upload; a second run on the prefix is
refused by the lock object; the endpoint going away mid-run is one error line
and nothing committed; a missing bucket is one clear error.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.lab import rgw_lab
from tests.lab.images import compare_images
from tests.lab.libvirt_lab import DiskSpec, MiB
from tests.system.backup_helpers import REPO, backup_cmd

pytestmark = [pytest.mark.system, pytest.mark.ceph]

SIZE = 64 * MiB
RESTORE = str(REPO / "virtnbdrestore")
SLOW = ("-z", "19", "--compress-method", "zstd", "--read-size", "256K")   # a moment "in the middle of the upload"


def _env(ep: rgw_lab.S3Endpoint) -> dict[str, str]:
    return {**os.environ, **ep.env(), "PYTHONUNBUFFERED": "1"}


def _backup(dom: Any, level: str, url: str, ep: rgw_lab.S3Endpoint, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(backup_cmd(dom, level, url, *extra), env=_env(ep), capture_output=True, text=True,
                          timeout=300, check=False)


def _ok(dom: Any, level: str, url: str, ep: rgw_lab.S3Endpoint, *extra: str) -> dict[str, Any]:
    done = _backup(dom, level, url, ep, *extra)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout), stderr=done.stderr)


def _points(ep: rgw_lab.S3Endpoint, bucket: str, prefix: str) -> list[str]:
    try:
        body = ep.client().get_object(Bucket=bucket, Key=f"{prefix}/virtnbd.manifest.json")["Body"].read()
    except ep.client().exceptions.NoSuchKey:
        return []
    return [p["name"] for p in json.loads(body)["points"]]


def _uploads(ep: rgw_lab.S3Endpoint, bucket: str) -> list[str]:
    return [u["Key"] for u in ep.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def _restore_exact(url: str, point: str, image: Path, work: Path, ep: rgw_lab.S3Endpoint) -> None:
    out = work / f"restore-{point}"
    done = subprocess.run([sys.executable, RESTORE, "-i", url, "-o", str(out), "-n", "--until", point,
                           "--format", "raw"], env=_env(ep), capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    compare_images(out / "sda.raw", image, fmt="raw")


def _start_slow(dom: Any, url: str, ep: rgw_lab.S3Endpoint, bucket: str) -> subprocess.Popen[str]:
    """An inc with much changed data, compressed slowly; returns once its multipart upload has a part."""
    proc = subprocess.Popen(backup_cmd(dom, "inc", url, *SLOW), env=_env(ep), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    client = ep.client()
    while time.monotonic() < deadline:
        ups = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        if ups and client.list_parts(Bucket=bucket, Key=ups[0]["Key"], UploadId=ups[0]["UploadId"]).get("Parts"):
            return proc
        if proc.poll() is not None:
            pytest.fail(f"backup ended before the moment: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no multipart upload with a part appeared")


def test_full_and_incs_into_the_bucket_restore_exact(make_domain, s3_endpoint, s3_bucket, tmp_path) -> None:
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    sda = dom.disk("sda")
    url = f"s3://{s3_bucket}/vm1"
    sda.write_data(0, 6 * MiB, seed=1)
    assert _ok(dom, "full", url, s3_endpoint, "-z")["point"] == "virtnbdbackup.0"     # lz4 frames
    expected = {"virtnbdbackup.0": sda.snapshot("p0")}
    for n in (1, 2):
        sda.write_data(n * 9 * MiB, 3 * MiB, seed=10 + n)
        sda.write_data(n * MiB, 64 * 1024, seed=20 + n)
        assert _ok(dom, "inc", url, s3_endpoint, "-z")["point"] == f"virtnbdbackup.{n}"
        expected[f"virtnbdbackup.{n}"] = sda.snapshot(f"p{n}")
    assert _points(s3_endpoint, s3_bucket, "vm1") == list(expected)
    keys = [o["Key"] for o in s3_endpoint.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert "vm1/vmconfig.virtnbdbackup.0.xml" in keys and "vm1/checkpoints/virtnbdbackup.2.xml" in keys
    assert any(k.startswith("vm1/backup.inc.") and k.endswith(".log") for k in keys), keys
    assert not [k for k in keys if k.endswith(".partial")] and _uploads(s3_endpoint, s3_bucket) == []
    for point, image in expected.items():
        _restore_exact(url, point, image, tmp_path, s3_endpoint)


def test_killed_upload_commits_nothing_second_run_refused_next_inc_exact(make_domain, s3_endpoint, s3_bucket,
                                                                         tmp_path) -> None:
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    sda = dom.disk("sda")
    url = f"s3://{s3_bucket}/vm2"
    sda.write_data(0, 4 * MiB, seed=1)
    _ok(dom, "full", url, s3_endpoint)
    expected = {"virtnbdbackup.0": sda.snapshot("p0")}
    sda.write_data(8 * MiB, 48 * MiB, seed=2)
    proc = _start_slow(dom, url, s3_endpoint, s3_bucket)
    try:
        second = _backup(dom, "inc", url, s3_endpoint)           # the same prefix while one runs
        assert second.returncode != 0
        assert "another" in second.stderr or "lock" in second.stderr.lower(), second.stderr
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _points(s3_endpoint, s3_bucket, "vm2") == ["virtnbdbackup.0"]
    assert _uploads(s3_endpoint, s3_bucket), "expected the killed run's upload to be left behind"
    orphan = "vm2/sdb.inc.virtnbdbackup.1.data"        # a stream whose upload completed, its point never committed
    s3_endpoint.client().put_object(Bucket=s3_bucket, Key=orphan, Body=b"uncommitted")
    sda.write_data(30 * MiB, MiB, seed=3)
    done = _ok(dom, "inc", url, s3_endpoint)
    assert done["point"] == "virtnbdbackup.1"
    assert _uploads(s3_endpoint, s3_bucket) == []
    assert "sdb.inc.virtnbdbackup.1.data: removed: no point of the manifest lists it" in done["stderr"], done
    assert "Contents" not in s3_endpoint.client().list_objects_v2(Bucket=s3_bucket, Prefix=orphan)
    expected["virtnbdbackup.1"] = sda.snapshot("p1")
    for point, image in expected.items():
        _restore_exact(url, point, image, tmp_path, s3_endpoint)


def test_endpoint_down_mid_run_is_one_error_nothing_committed(make_domain, s3_endpoint, s3_bucket,
                                                              tmp_path) -> None:
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    sda = dom.disk("sda")
    url = f"s3://{s3_bucket}/vm3"
    sda.write_data(0, 4 * MiB, seed=1)
    _ok(dom, "full", url, s3_endpoint)
    sda.write_data(8 * MiB, 48 * MiB, seed=2)
    proc = _start_slow(dom, url, s3_endpoint, s3_bucket)
    try:
        rgw_lab.stop_gateway(s3_endpoint)
        started = time.monotonic()
        _out, err = proc.communicate(timeout=240)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        rgw_lab.restart_gateway(s3_endpoint)
    assert proc.returncode not in (0, None)
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and "S3 endpoint unreachable" in lines[0], err
    assert "Traceback" not in err
    assert took < 120
    assert _points(s3_endpoint, s3_bucket, "vm3") == ["virtnbdbackup.0"]
    sda.write_data(40 * MiB, MiB, seed=4)
    assert _ok(dom, "inc", url, s3_endpoint)["point"] == "virtnbdbackup.1"
    assert _uploads(s3_endpoint, s3_bucket) == []
    _restore_exact(url, "virtnbdbackup.1", sda.snapshot("p1"), tmp_path, s3_endpoint)


def test_missing_bucket_is_one_clear_error(make_domain, s3_endpoint) -> None:
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", 8 * MiB)])
    done = _backup(dom, "full", "s3://vnbd-no-such-bucket/vm", s3_endpoint)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [line for line in done.stderr.strip().splitlines()
                                                if "bucket does not exist" in line], done.stderr
    assert dom.dom.listAllCheckpoints() == []
