"""Start-up cost: a plain local verify, dump or restore loads no feature it does not use.

Encryption (``cryptography``), object storage (boto3/botocore; with them never pyOpenSSL), other
hosts (ssh, remote shell, remote qemu-nbd), libvirt, libnbd, lxml and Ceph are resolved by their registries (set kind,
store scheme, target scheme, host) only when a set, location or option needs them. Each check
runs the real command in a fresh interpreter (``sys.modules`` of this one is shared by all tests)
on a small synthetic set, then lists the modules it loaded; the last test shows the check fails
when such a module is loaded.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.functional.restore_sets import SetBuilder

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("cryptography", "boto3", "botocore", "s3transfer", "libvirt", "libvirtmod", "nbd", "lxml", "rados", "rbd",
         "virtnbd.crypto.aead", "virtnbd.crypto.keyring", "virtnbd.backupset.sealed", "virtnbd.backupset.s3store",
         "virtnbd.remote.ssh", "virtnbd.remote.remotehost", "virtnbd.remote.rshell", "virtnbd.remote.session",
         "virtnbd.restore.targets.remote", "virtnbd.restore.config")
BACKUP_HEAVY = ("cryptography", "boto3", "botocore", "virtnbd.crypto.aead", "virtnbd.backupset.sealed",
                "virtnbd.backupset.s3store", "virtnbd.remote.ssh", "virtnbd.remote.remotehost",
                "virtnbd.remote.rshell", "virtnbd.restore.targets.remote")

CHILD = """
import json, sys
pre, heavy, argv = json.loads(sys.argv[1])
for name in pre:
    __import__(name)
if argv == ["s3-client"]:
    from virtnbd.backupset import s3store
    a = s3store.make_client(s3store.S3Options(endpoint="http://127.0.0.1:9"))
    assert s3store.make_client(s3store.S3Options(endpoint="http://127.0.0.1:9")) is a    # one per options
    assert s3store.make_client(s3store.S3Options(endpoint="http://127.0.0.1:8")) is not a
elif argv[:1] == ["--help-of"]:
    import contextlib, importlib, io  # noqa: E401
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        importlib.import_module(argv[1]).main(["--help"])
elif argv:
    from virtnbd.cli.restore import main
    if main(argv) != 0:
        sys.exit("command failed")
else:
    import virtnbd.backup.run, virtnbd.cli.backup  # noqa: E401
print(json.dumps(sorted(m for m, mod in sys.modules.items()
                         if mod is not None and any(m == h or m.startswith(h + ".") for h in heavy))))
"""


def loaded(argv: list[str], heavy: tuple[str, ...] = HEAVY, pre: tuple[str, ...] = ()) -> list[str]:
    """The modules of ``heavy`` a fresh interpreter holds after ``virtnbdrestore argv`` (no argv: the
    backup command's modules imported)."""
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([list(pre), list(heavy), argv])], cwd=REPO,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return list(json.loads(out.stdout.splitlines()[-1]))


@pytest.fixture(scope="module")
def plain_set(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = str(tmp_path_factory.mktemp("startup") / "set")
    b = SetBuilder(folder, size=2 << 20, compression="lz4")
    b.scribble(8)
    b.full()
    b.scribble(3)
    b.inc()
    return folder


@pytest.mark.parametrize("action", [["-a", "verify"], ["-a", "dump"], ["-o", "OUT"], ["-o", "OUT", "--format", "raw"]])
def test_plain_local_commands_load_no_unused_feature(plain_set: str, tmp_path: Path, action: list[str]) -> None:
    argv = ["-n", "-i", plain_set, *[str(tmp_path / "out") if a == "OUT" else a for a in action]]
    assert loaded(argv) == []


def test_backup_modules_load_no_crypto_s3_or_ssh() -> None:
    assert loaded([], BACKUP_HEAVY) == []


@pytest.mark.parametrize("command", ["backup", "restore", "prune", "key", "map", "mount", "job"])
def test_help_loads_no_feature(command: str) -> None:
    """``--help`` (and argv parsing) of every command: no cipher, S3, libvirt, NBD, XML or Ceph library."""
    assert loaded(["--help-of", f"virtnbd.cli.{command}"]) == []


def test_an_s3_client_is_shared_and_loads_no_pyopenssl() -> None:
    """botocore would import urllib3.contrib.pyopenssl (pyOpenSSL + cryptography) for nothing."""
    assert loaded(["s3-client"], ("cryptography", "OpenSSL", "urllib3.contrib.pyopenssl")) == []


def test_the_check_sees_a_loaded_feature(plain_set: str) -> None:
    found = loaded(["-n", "-i", plain_set, "-a", "verify"], pre=("virtnbd.backupset.sealed", "botocore"))
    assert "cryptography" in found and "virtnbd.backupset.sealed" in found and "botocore" in found
