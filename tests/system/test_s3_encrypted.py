"""virtnbdbackup --key-file -o s3://: an encrypted chain in a real RADOS Gateway bucket, proved by bytes.

A full and an inc of a real domain go encrypted into the bucket; both points restore
byte-identical from it with the key; verify with the key authenticates, without it says it
could not; a restore without the key is refused, a verify with a wrong S3 secret says so in one
line; and a marker text written into the guest disk appears in no stored object (the disk's own
bytes in another prefix are the control: there it does).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.lab import rgw_lab
from tests.lab.diskops import Op
from tests.lab.images import compare_images
from tests.lab.libvirt_lab import DiskSpec, MiB
from tests.system.backup_helpers import REPO, backup_cmd

pytestmark = [pytest.mark.system, pytest.mark.ceph]

SIZE = 16 * MiB
MARKER = b"VNBD-S3-MARKER-5d1c0b7e-"
RESTORE = str(REPO / "virtnbdrestore")


class MarkerOp(Op):
    """A data write whose bytes are the marker text repeated (what the scan looks for)."""

    def data(self) -> bytes:
        return (MARKER * (self.length // len(MARKER) + 1))[:self.length]


def _env(ep: rgw_lab.S3Endpoint) -> dict[str, str]:
    return {**os.environ, **ep.env(), "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], ep: rgw_lab.S3Endpoint) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=_env(ep), capture_output=True, text=True, timeout=300, check=False)


def _backup(dom: Any, level: str, url: str, ep: rgw_lab.S3Endpoint, *extra: str) -> dict[str, Any]:
    done = _run(backup_cmd(dom, level, url, *extra), ep)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def _restore(url: str, point: str, out: Path, ep: rgw_lab.S3Endpoint, *key: str) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, RESTORE, "-n", "-i", url, "-o", str(out), "--until", point, "--format", "raw", *key],
                ep)


def _objects_with_marker(ep: rgw_lab.S3Endpoint, bucket: str, prefix: str) -> tuple[int, list[str]]:
    """(objects read, keys of those holding the marker or a piece of it) below ``prefix/``."""
    client = ep.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/").get("Contents", [])]
    found = [k for k in keys if MARKER[:12] in client.get_object(Bucket=bucket, Key=k)["Body"].read()]
    return len(keys), found


def test_encrypted_full_and_inc_in_the_bucket_exact_and_no_plaintext(make_domain, s3_endpoint, s3_bucket,
                                                                     tmp_path) -> None:
    dom = make_domain(disks=[DiskSpec("sda", "sata", "qcow2", SIZE)])
    sda = dom.disk("sda")
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    url = f"s3://{s3_bucket}/enc"
    expected = {}
    for step, level in enumerate(("full", "inc")):
        sda.write_data(step * 4 * MiB, 2 * MiB, seed=30 + step)
        sda.apply(MarkerOp("data", (8 + step * 3) * MiB, 256 << 10))
        summary = _backup(dom, level, url, s3_endpoint, "--key-file", str(key), *(("-z",) if step else ()))
        expected[summary["point"]] = sda.snapshot(f"s3enc{step}")
    assert list(expected) == ["virtnbdbackup.0", "virtnbdbackup.1"]
    assert s3_endpoint.client().head_object(Bucket=s3_bucket, Key="enc/virtnbd.keys.json")
    read, found = _objects_with_marker(s3_endpoint, s3_bucket, "enc")
    assert read >= 6 and found == []
    for point, image in expected.items():
        done = _restore(url, point, tmp_path / f"out-{point}", s3_endpoint, "--key-file", str(key))
        assert done.returncode == 0, done.stderr
        compare_images(tmp_path / f"out-{point}" / "sda.raw", image, fmt="raw")
    refused = _restore(url, "virtnbdbackup.1", tmp_path / "nokey", s3_endpoint)
    assert refused.returncode == 1 and "encrypted" in refused.stderr, refused.stderr
    assert not (tmp_path / "nokey" / "sda.raw").exists()
    keyless = _run([sys.executable, RESTORE, "-n", "-i", url, "-a", "verify"], s3_endpoint)
    assert keyless.returncode == 0 and "could NOT be authenticated" in keyless.stderr, keyless.stderr
    wrong = subprocess.run([sys.executable, RESTORE, "-n", "-i", url, "-a", "verify"], capture_output=True, text=True,
                           env={**_env(s3_endpoint), "AWS_SECRET_ACCESS_KEY": "wrong" * 8}, timeout=120, check=False)
    assert wrong.returncode == 1 and "secret key does not match" in wrong.stderr, wrong.stderr      # one clear line
    assert len(wrong.stderr.strip().splitlines()) == 1
    # control: the disk's own bytes, stored as they are, show the marker, so the scan can fail
    image = expected["virtnbdbackup.1"].read_bytes()
    s3_endpoint.client().put_object(Bucket=s3_bucket, Key="plain/sda.raw", Body=image)
    assert _objects_with_marker(s3_endpoint, s3_bucket, "plain") == (1, ["plain/sda.raw"])
