"""The CI guarantee of tests/conftest.py: with CI=true a skipped test fails the run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SAMPLE = '''
import pytest

def test_needs_a_service():
    pytest.skip("libvirtd absent")

@pytest.mark.xfail(reason="known")
def test_known_failure():
    assert False

def test_plain():
    assert True
'''


def run_sample(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    sample = tmp_path / "test_sample.py"
    sample.write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-q", "-rA", "--rootdir", str(tmp_path),
         "-p", "no:cacheprovider", str(sample)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.mark.parametrize("ci", ["true", "1"])
def test_skip_fails_in_ci(tmp_path: Path, ci: str) -> None:
    proc = run_sample(tmp_path, ci)
    assert proc.returncode == 1, proc.stdout
    assert "skipped in CI is a failure" in proc.stdout
    assert "libvirtd absent" in proc.stdout
    assert "1 failed, 1 passed, 1 xfailed" in proc.stdout  # xfail stays an xfail


def test_skip_is_a_skip_locally(tmp_path: Path) -> None:
    proc = run_sample(tmp_path, None)
    assert proc.returncode == 0, proc.stdout
    assert "1 passed, 1 skipped, 1 xfailed" in proc.stdout
