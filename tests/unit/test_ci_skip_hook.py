"""The CI rule (tests/ci_skip_rule.py, loaded by tests/conftest.py): with CI=true every kind of skip
fails the run -- at run time, in setup (skip/skipif marks, importorskip in a fixture) and at collection
(module-level importorskip or skip) -- while locally a skip stays a skip. And `.ci/run` sets CI itself."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MISSING = "virtnbd_no_such_module_i22"

KINDS = {
    "runtime_skip": '''
import pytest

def test_needs_a_service():
    pytest.skip("libvirtd absent")
''',
    "skip_mark": '''
import pytest

@pytest.mark.skip(reason="libvirtd absent")
def test_marked():
    pass
''',
    "skipif_mark": '''
import pytest

@pytest.mark.skipif(True, reason="libvirtd absent")
def test_marked():
    pass
''',
    "fixture_importorskip": f'''
import pytest

@pytest.fixture
def lib():
    return pytest.importorskip("{MISSING}")

def test_uses(lib):
    pass
''',
    "module_importorskip": f'''
import pytest

pytest.importorskip("{MISSING}")

def test_never_collected():
    pass
''',
    "module_skip": '''
import pytest

pytest.skip("libvirtd absent", allow_module_level=True)

def test_never_collected():
    pass
''',
}

PLAIN = '''
import pytest

def test_plain():
    assert True

@pytest.mark.xfail(reason="known")
def test_known_failure():
    assert False
'''


def run_pytest(folder: Path, ci: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = str(ROOT)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.ci_skip_rule", "-q", "-rA", "--rootdir", str(folder),
         "-p", "no:cacheprovider", str(folder)],
        cwd=folder, env=env, capture_output=True, text=True, timeout=120, check=False,
    )


def sample(tmp_path: Path, files: dict[str, str]) -> Path:
    folder = tmp_path / "sample"
    folder.mkdir()
    for name, text in files.items():
        (folder / f"test_{name}.py").write_text(text)
    return folder


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_of_skip_fails_in_ci(tmp_path: Path, kind: str) -> None:
    proc = run_pytest(sample(tmp_path, {kind: KINDS[kind], "plain": PLAIN}), "true")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "skipped in CI is a failure" in out, out
    assert ("libvirtd absent" in out) or (MISSING in out), out
    assert " skipped" not in out.splitlines()[-1], out


@pytest.mark.parametrize("ci", ["true", "1", "yes"])
def test_runtime_skip_fails_and_xfail_stays_xfail(tmp_path: Path, ci: str) -> None:
    proc = run_pytest(sample(tmp_path, {"runtime_skip": KINDS["runtime_skip"], "plain": PLAIN}), ci)
    assert proc.returncode == 1, proc.stdout
    assert "1 failed, 1 passed, 1 xfailed" in proc.stdout


def test_every_kind_is_a_skip_locally(tmp_path: Path) -> None:
    proc = run_pytest(sample(tmp_path, {**KINDS, "plain": PLAIN}), None)
    assert proc.returncode == 0, proc.stdout
    # 4 skipped tests + 2 skipped modules; the plain file passes and xfails
    assert "1 passed, 6 skipped, 1 xfailed" in proc.stdout, proc.stdout


def test_no_skip_passes_in_ci(tmp_path: Path) -> None:
    proc = run_pytest(sample(tmp_path, {"plain": PLAIN}), "true")
    assert proc.returncode == 0, proc.stdout
    assert "1 passed, 1 xfailed" in proc.stdout


# ---- .ci/run itself: a copy of the real .ci/run and scripts/test, run without CI in the environment


def ci_tree(tmp_path: Path, tests: dict[str, str]) -> Path:
    """A project tree whose .ci/run and scripts/test are the real ones; setup and lab are stubs."""
    tree = tmp_path / "tree"
    (tree / ".ci").mkdir(parents=True)
    (tree / "scripts" / "lab").mkdir(parents=True)
    shutil.copy2(ROOT / ".ci" / "run", tree / ".ci" / "run")
    shutil.copy2(ROOT / "scripts" / "test", tree / "scripts" / "test")
    for stub in ("scripts/setup", "scripts/lab/libvirtd", "scripts/lab/remote"):
        (tree / stub).write_text("#!/bin/sh\nexit 0\n")
        (tree / stub).chmod(0o755)
    (tree / ".venv").symlink_to(ROOT / ".venv")
    (tree / "virtnbd").mkdir()
    (tree / "virtnbd" / "__init__.py").write_text("")
    (tree / "tests").mkdir()
    (tree / "tests" / "conftest.py").write_text('pytest_plugins = ["tests_ci_rule"]\n')
    (tree / "tests_ci_rule.py").write_text("from tests.ci_skip_rule import *  # noqa: F403\n"
                                           "from tests.ci_skip_rule import _SKIPS_SEEN  # noqa: F401\n")
    (tree / "pyproject.toml").write_text('[tool.pytest.ini_options]\ntestpaths = ["tests"]\n'
                                         'addopts = "-p no:cacheprovider"\n'
                                         '[tool.ruff.lint]\nselect = ["E9"]\n')
    for name, text in tests.items():
        (tree / "tests" / f"test_{name}.py").write_text(text)
    return tree


def run_ci(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = f"{tree}:{ROOT}"
    env["MYPY_CACHE_DIR"] = str(tree / ".mypy_cache")
    env["RUFF_CACHE_DIR"] = str(tree / ".ruff_cache")
    return subprocess.run([str(tree / ".ci" / "run")], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=300, check=False)


def test_ci_run_fails_on_a_module_level_importorskip(tmp_path: Path) -> None:
    proc = run_ci(ci_tree(tmp_path, {"module_importorskip": KINDS["module_importorskip"], "plain": PLAIN}))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "== FAILED: pytest" in out, out
    assert "skipped in CI is a failure" in out and MISSING in out, out


def test_ci_run_passes_without_skips(tmp_path: Path) -> None:
    proc = run_ci(ci_tree(tmp_path, {"plain": PLAIN}))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "== all passed" in out, out
