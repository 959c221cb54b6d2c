"""scripts/demo (the README's first command) runs end to end, twice, and cleans up its domain."""
from __future__ import annotations

import subprocess

import pytest

from tests.system.backup_helpers import REPO

pytestmark = pytest.mark.system

DEMO_DIR = "/var/lib/libvirt/images/virtnbd-demo"


def _domain_exists() -> bool:
    res = subprocess.run(["virsh", "-c", "qemu:///system", "dominfo", "virtnbd-demo"], capture_output=True,
                         check=False)
    return res.returncode == 0


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(REPO / "scripts" / "demo"), *args], capture_output=True, text=True, timeout=600,
                         check=False, cwd="/")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("Images are identical.") == 3, res.stdout[-3000:]
    assert "== done" in res.stdout
    assert not _domain_exists()
    return res


@pytest.mark.slow
def test_demo_runs_twice_and_proves_the_restore(libvirt_daemons) -> None:  # type: ignore[no-untyped-def]
    first = _demo()
    assert f"backup set:            {DEMO_DIR}/backup" in first.stdout
    assert subprocess.run(["test", "-s", f"{DEMO_DIR}/restore/sda.qcow2"], check=False).returncode == 0
    _demo("--clean")  # second run replaces the first one's leftovers, then removes its folder
    assert subprocess.run(["test", "-e", DEMO_DIR], check=False).returncode != 0
