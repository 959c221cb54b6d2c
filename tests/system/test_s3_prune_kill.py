"""SIGKILL of virtnbdprune --consolidate on an s3:// set at several moments (the N-th request sent):
every point the manifest lists restores exact and verifies, and a second run finishes the job."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.functional.restore_sets import compare, small_lz4_chain
from tests.lab import rgw_lab
from tests.lab.fault_lab import CrashRunner
from tests.system.test_s3_sets import _upload_set
from virtnbd.backupset import manifest, naming
from virtnbd.backupset.s3store import ObjectStore
from virtnbd.cli.restore import main as restore_main

pytestmark = [pytest.mark.system, pytest.mark.ceph]

ROOT = str(Path(__file__).resolve().parents[2])
MOMENTS = (8, 25, 45, 65, 80)      # of ~100 sendto calls: lock, journal, new stream, manifest, deletions


def _restore_listed(url: str, shadows: dict[str, str]) -> list[str]:
    found = ObjectStore(url).read_bytes(naming.MANIFEST)
    assert found is not None
    points = [p.name for p in manifest.from_json(found, url).points]
    with tempfile.TemporaryDirectory(prefix="vnbd-s3k-") as out:
        for point in points:
            target = os.path.join(out, point)
            assert restore_main(["-i", url, "-o", target, "--until", point, "--format", "raw", "-n"]) == 0
            compare(os.path.join(target, "sda.raw"), "raw", shadows[point])
    assert restore_main(["-i", url, "-a", "verify", "-n"]) == 0
    return points


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    return small_lz4_chain(str(tmp_path_factory.mktemp("s3kill") / "set"), 3)


@pytest.mark.parametrize("n", MOMENTS)
def test_kill_prune_in_the_bucket(pristine, s3_endpoint: rgw_lab.S3Endpoint, s3_bucket: str,
                                  monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    if shutil.which("strace") is None:
        pytest.fail("strace is missing (scripts/setup installs it)")
    for key, value in s3_endpoint.env().items():
        monkeypatch.setenv(key, value)
    folder, shadows = pristine
    url = f"s3://{s3_bucket}/vm"
    _upload_set(folder, ObjectStore(url))
    cmd = [sys.executable, "-m", "virtnbd.cli.prune", "-i", url, "--consolidate", "virtnbdbackup.2"]
    runner = CrashRunner(cwd=Path(ROOT), env=dict(os.environ))
    try:
        out = runner.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=sendto",
                          "-e", f"inject=sendto:signal=SIGKILL:when={n}", "--", *cmd])
        assert out.returncode in (-9, 137), f"not killed at sendto #{n}: {out.returncode} {out.stderr[-400:]}"
        _restore_listed(url, shadows)                     # whatever the manifest lists is exact
        again = runner.run(cmd)
        assert again.returncode == 0, again.stderr
    finally:
        runner.close()
    assert _restore_listed(url, shadows) == ["virtnbdbackup.2", "virtnbdbackup.3"]
    store = ObjectStore(url)
    found = store.read_bytes(naming.MANIFEST)
    assert found is not None
    listed = sorted(d.file for p in manifest.from_json(found, url).points for d in p.disks.values())
    names = store.list()
    assert sorted(x for x in names if x.endswith(".data")) == listed
    assert not [x for x in names if x.endswith((".journal", ".partial", ".tmp", ".lock"))], names
    assert store.uploads() == []
