"""A real S3 endpoint for tests: Ceph RADOS Gateway on the throw-away memstore cluster.

One ``radosgw`` (beast frontend) bound to 127.0.0.1 on a free port, its pid file in
the cluster's ``run/`` folder (so ``ceph_lab.stop`` ends it with the other daemons),
garbage collection of deleted data after a few seconds (Ceph's default keeps it in
memstore RAM for two hours), and one S3 user with random keys.

Session fixture ``s3_endpoint`` (registered in tests/conftest.py); from the shell:
``scripts/lab/rgw start|stop DIR`` prints sourceable ``export AWS_…`` lines.
"""
from __future__ import annotations

import argparse
import contextlib
import secrets
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lab import ceph_lab

NAME = "client.rgw.x"
START_TIMEOUT = 60
GC_WAIT = 5


@dataclass(frozen=True)
class S3Endpoint:
    url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"
    cluster: ceph_lab.CephCluster | None = None

    def env(self) -> dict[str, str]:
        """What boto3 reads from the environment (credentials never go on a command line)."""
        return {
            "AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region)


def available() -> bool:
    import shutil

    return ceph_lab.available() and bool(shutil.which("radosgw")) and bool(shutil.which("radosgw-admin"))


def _rgw_section(c: ceph_lab.CephCluster, port: int) -> str:
    d = c.folder
    return f"""
[{NAME}]
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
keyring = {d}/rgw.x/keyring
rgw data = {d}/rgw.x
rgw frontends = beast endpoint=127.0.0.1:{port}
rgw gc obj min wait = {GC_WAIT}
rgw gc processor period = {GC_WAIT}
rgw dynamic resharding = false
debug rgw = 0
"""


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/", timeout=5) as resp:  # noqa: S310 - loopback lab endpoint
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _random(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def start(c: ceph_lab.CephCluster) -> S3Endpoint:
    """Start radosgw on a running lab cluster and create the S3 user ``test``."""
    (c.folder / "rgw.x").mkdir(exist_ok=True)
    c.ceph("auth", "get-or-create", NAME, "mon", "allow rw", "osd", "allow rwx", "-o", str(c.folder / "rgw.x/keyring"))
    port = ceph_lab._free_port()
    with c.conf.open("a") as f:
        f.write(_rgw_section(c, port))
    ceph_lab._run(["radosgw", "-c", str(c.conf), "-n", NAME], timeout=60)
    url = f"http://127.0.0.1:{port}"
    ceph_lab._wait_for("radosgw", lambda: _answers(url), START_TIMEOUT)
    access = _random(string.ascii_uppercase + string.digits, 20)
    secret = _random(string.ascii_letters + string.digits, 40)
    ceph_lab._run(["radosgw-admin", "-c", str(c.conf), "user", "create", "--uid=test", "--display-name=test",
                   f"--access-key={access}", f"--secret={secret}"], timeout=60)
    return S3Endpoint(url=url, access_key=access, secret_key=secret, cluster=c)


def stop_gateway(endpoint: S3Endpoint, sig: str = "TERM") -> None:
    """Stop radosgw alone (SIGTERM: a SIGKILLed gateway stalls the next start for up to 30 s)."""
    assert endpoint.cluster is not None
    pidfile = endpoint.cluster.folder / "run" / f"{NAME}.pid"
    with contextlib.suppress(OSError, ValueError):
        pid = int(pidfile.read_text())
        subprocess.run(["kill", f"-{sig}", str(pid)], check=False)
        deadline = time.monotonic() + 20
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def restart_gateway(endpoint: S3Endpoint) -> None:
    assert endpoint.cluster is not None
    ceph_lab._run(["radosgw", "-c", str(endpoint.cluster.conf), "-n", NAME], timeout=60)
    ceph_lab._wait_for("radosgw", lambda: _answers(endpoint.url), START_TIMEOUT)


def collect_garbage(endpoint: S3Endpoint) -> None:
    """Free deleted objects' RADOS data now (memstore keeps it in RAM until then)."""
    assert endpoint.cluster is not None
    ceph_lab._run(["radosgw-admin", "-c", str(endpoint.cluster.conf), "gc", "process", "--include-all"], timeout=60)


@pytest.fixture(scope="session")
def s3_endpoint(ceph_cluster: ceph_lab.CephCluster) -> Iterator[S3Endpoint]:
    """Session-wide S3 endpoint (RGW) on the session's Ceph cluster; stopped with it."""
    if not available():
        pytest.skip("radosgw is not installed")
    yield start(ceph_cluster)


@pytest.fixture()
def s3_bucket(s3_endpoint: S3Endpoint) -> Iterator[str]:
    """A fresh bucket, emptied and removed afterwards."""
    name = f"vnbd-{secrets.token_hex(4)}"
    client = s3_endpoint.client()
    client.create_bucket(Bucket=name)
    yield name
    with contextlib.suppress(Exception):
        _empty(client, name)
        client.delete_bucket(Bucket=name)


def _empty(client, bucket: str) -> None:  # type: ignore[no-untyped-def]
    for up in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/lab/rgw", description="throw-away Ceph + RADOS Gateway (S3)")
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("folder")
    parser.add_argument("--memstore-bytes", type=int, default=4 << 30,
                        help="OSD memory (default 4 GiB: benchmarks upload GiBs; a full memstore hangs writes)")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            ep = start(ceph_lab.start(args.folder, args.memstore_bytes))
            env = "".join(f"export {k}={v}\n" for k, v in ep.env().items())
            env_file = Path(args.folder) / "s3.env"
            env_file.write_text(env)
            env_file.chmod(0o600)
            print(f"# rgw: S3 endpoint {ep.url}; credentials in {env_file} (source it)")
        else:
            ceph_lab.stop(args.folder)
            print("rgw: stopped")
    except ceph_lab.CephLabError as err:
        print(f"rgw: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
