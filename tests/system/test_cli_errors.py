"""Bad input to either command: one clear error line, non-zero exit, no traceback.

Runs the top-level scripts of the checkout (./virtnbdbackup, ./virtnbdrestore)
as a user would.
"""
from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.system

BACKUP_ARGS = ["-d", "x", "-l", "full", "-o", "/tmp/x"]
RESTORE_ARGS = ["-i", "/tmp/x", "-o", "/tmp/y"]


def run_tool(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    script = ROOT / tool
    if not script.exists():
        pytest.fail(f"./{tool} is missing from the checkout")
    return subprocess.run([str(script), *args], capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)


def assert_one_error_line(proc: subprocess.CompletedProcess[str], tool: str, *needles: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, f"exit 0 on bad input; stderr={proc.stderr!r}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith(f"{tool}: "), line
    assert "error" in line.lower(), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (BACKUP_ARGS + ["--bogus-option"], "--bogus-option"),
        (["-d", "x", "-l", "weekly", "-o", "/tmp/x"], "weekly"),
        (["-l", "full", "-o", "/tmp/x"], "-d"),
    ],
)
def test_backup_bad_option(args: list[str], needle: str) -> None:
    proc = run_tool("virtnbdbackup", *args)
    assert_one_error_line(proc, "virtnbdbackup", needle)
    assert proc.returncode == 1


def test_backup_unknown_domain(libvirt_conn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    name = f"vnbdtest-missing-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "backup"
    proc = run_tool("virtnbdbackup", "-d", name, "-l", "full", "-o", str(out))
    assert_one_error_line(proc, "virtnbdbackup", name)
    # nothing left behind that looks like a backup
    assert not out.exists() or not any(out.glob("*.data"))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (RESTORE_ARGS + ["--bogus-option"], "--bogus-option"),
        (["-i", "/tmp/x", "-a", "explode"], "explode"),
        (["-o", "/tmp/x"], "-i"),
    ],
)
def test_restore_bad_option(args: list[str], needle: str) -> None:
    proc = run_tool("virtnbdrestore", *args)
    assert_one_error_line(proc, "virtnbdrestore", needle)
    assert proc.returncode == 1


def test_restore_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-backup"
    out = tmp_path / "restored"
    proc = run_tool("virtnbdrestore", "-i", str(missing), "-o", str(out))
    assert_one_error_line(proc, "virtnbdrestore", str(missing))
    assert not out.exists() or not any(out.iterdir())


def test_restore_folder_is_not_a_backup_set(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a backup\n")
    proc = run_tool("virtnbdrestore", "-i", str(folder), "-o", str(tmp_path / "restored"))
    assert_one_error_line(proc, "virtnbdrestore", str(folder))


@pytest.mark.parametrize("action", ["dump", "verify"])
def test_restore_actions_on_missing_folder(tmp_path: Path, action: str) -> None:
    missing = tmp_path / "gone"
    proc = run_tool("virtnbdrestore", "-i", str(missing), "-a", action)
    assert_one_error_line(proc, "virtnbdrestore", str(missing))
