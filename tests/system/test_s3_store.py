"""The S3 store against a real RADOS Gateway: uploads, ranged reads, lock, stale uploads, errors."""
from __future__ import annotations

import os
import time

import pytest

from tests.lab import rgw_lab
from virtnbd import errors
from virtnbd.backupset import s3store
from virtnbd.backupset.s3store import S3Options, S3Store, S3Url, part_size_for

pytestmark = [pytest.mark.system, pytest.mark.ceph]


@pytest.fixture()
def store(s3_endpoint: rgw_lab.S3Endpoint, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    for key, value in s3_endpoint.env().items():
        monkeypatch.setenv(key, value)
    return S3Store(f"s3://{s3_bucket}/vm1", S3Options(read_timeout=10, attempts=2))


def test_url_and_part_size() -> None:
    assert S3Url.parse("s3://b/x/y/") == S3Url("b", "x/y")
    assert S3Url.parse("s3://b").key("m") == "m"
    with pytest.raises(errors.UsageError):
        S3Url.parse("s3:///x")
    assert part_size_for(1 << 30) == s3store.MIN_PART == 5 << 20
    assert part_size_for(2 << 40) * 9900 >= 2 << 40


def test_multipart_upload_visible_only_after_commit_and_ranged_reads(store: S3Store) -> None:
    data = os.urandom(20 << 20)
    with store.upload("sda.full.data", expected_size=len(data)) as up:
        for i in range(0, len(data), 3 << 20):
            up.write(data[i:i + (3 << 20)])
        assert store.size("sda.full.data") is None          # nothing visible before commit
        assert [u[0] for u in store.uploads()] == ["sda.full.data"]
        up.commit()
    assert store.size("sda.full.data") == len(data)
    assert store.uploads() == []
    obj = store.open_ranged("sda.full.data")
    for off in (0, (8 << 20) - 7, len(data) - 5):            # crossing a part boundary, the tail
        assert obj.pread(4096, off) == data[off:off + 4096]
    obj.seek(100)
    assert obj.read(10) == data[100:110]
    assert store.listing() == [("sda.full.data", len(data))]


def test_part_buffers_reused_and_regrown(store: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts filled in place in reused buffers; a grown part size (unknown length) gets new ones."""
    monkeypatch.setattr(s3store, "PARTS_PER_STEP", 2)        # 5, 5, 10, 10 MiB parts, then a 3 MiB tail
    data = os.urandom(33 << 20)
    with store.upload("grown.data") as up:
        for i in range(0, len(data), 777_777):
            up.write(memoryview(data)[i:i + 777_777])
        up.commit()
    assert store.get("grown.data") == data


def test_failed_upload_is_aborted(store: S3Store) -> None:
    with pytest.raises(RuntimeError), store.upload("x.data") as up:
        up.write(os.urandom(9 << 20))
        raise RuntimeError("writer failed")
    assert store.uploads() == [] and store.size("x.data") is None


def test_stale_uploads_found_and_aborted(store: S3Store) -> None:
    up = store.upload("killed.data")
    up.write(os.urandom(9 << 20))                          # one part sent, never completed: a killed run
    up._pool.shutdown()
    assert [u[0] for u in store.uploads()] == ["killed.data"]
    assert store.abort_stale_uploads() == ["killed.data"]
    assert store.uploads() == []


def test_second_lock_refused(store: S3Store, s3_endpoint: rgw_lab.S3Endpoint) -> None:
    other = S3Store(store.url, store.options)
    with store.lock("backup"):
        with pytest.raises(errors.LockedError, match="locked by running process"):
            with other.lock("backup"):
                pass
    with other.lock("backup"):                              # released: the next run gets it
        pass


def test_wrong_secret_and_missing_bucket(s3_endpoint: rgw_lab.S3Endpoint, s3_bucket: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3_endpoint.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong" * 8)
    with pytest.raises(errors.StorageError, match="secret key does not match"):
        S3Store(f"s3://{s3_bucket}/p").check_bucket()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_endpoint.secret_key)
    with pytest.raises(errors.StorageError, match="bucket does not exist"):
        S3Store("s3://vnbd-no-such-bucket/p").put("m", b"x")


def test_endpoint_down_fails_within_timeout(s3_endpoint: rgw_lab.S3Endpoint, s3_bucket: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in s3_endpoint.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")   # nothing listens on discard
    t0 = time.monotonic()
    with pytest.raises(errors.StorageError, match="endpoint unreachable"):
        S3Store(f"s3://{s3_bucket}/p", S3Options(connect_timeout=2, attempts=2)).check_bucket()
    assert time.monotonic() - t0 < 30
