"""The fault lab really crashes processes and really fills filesystems."""
from __future__ import annotations

import errno
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.lab.fault_lab import appears, fill_fs, kill_points
from virtnbd import errors, fsutil

MiB = 1024 * 1024


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text().split()
    return stat[2] != "Z"


def test_kill_points_are_deterministic_and_spread() -> None:
    a = kill_points(seed=3, n=5, duration=10.0)
    assert a == kill_points(seed=3, n=5, duration=10.0)
    assert a != kill_points(seed=4, n=5, duration=10.0)
    assert all(0.5 <= t <= 9.5 for t in a)
    assert a == sorted(a)  # one per slice: early to late


def test_run_to_the_end(crash_runner) -> None:  # type: ignore[no-untyped-def]
    out = crash_runner.run([sys.executable, "-c", "print('done')"])
    assert out.finished and out.returncode == 0 and out.stdout == "done\n"


def test_kill_after_kills_the_whole_group(crash_runner, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pidfile = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}; wait"
    out = crash_runner.kill_when(["bash", "-c", script], appears(tmp_path, "child.pid"), timeout=30)
    assert out.killed and out.returncode == -signal.SIGKILL
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive(child), "the grandchild survived the crash"


def test_kill_after_a_delay(crash_runner) -> None:  # type: ignore[no-untyped-def]
    out = crash_runner.kill_after(["sleep", "30"], 0.2)
    assert out.killed and 0.2 <= out.elapsed < 5


def test_process_that_ends_first_is_not_reported_killed(crash_runner) -> None:  # type: ignore[no-untyped-def]
    out = crash_runner.kill_after(["true"], 5)
    assert out.finished and out.returncode == 0 and out.elapsed < 5


def test_sigterm_goes_to_the_command_which_cleans_up(crash_runner, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ready, done = tmp_path / "ready", tmp_path / "cleaned"
    code = (
        "import pathlib, signal, sys, time\n"
        f"def bye(*_): pathlib.Path({str(done)!r}).touch(); sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
    )
    out = crash_runner.kill_when([sys.executable, "-c", code], ready.exists, sig=signal.SIGTERM, timeout=30)
    assert out.killed and out.returncode == 143 and done.exists()


def test_crash_at_points_resets_and_kills_each_time(crash_runner, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    resets: list[int] = []
    marker = tmp_path / "steps"
    code = (
        "import pathlib, time\n"
        f"p = pathlib.Path({str(marker)!r})\n"
        "for i in range(10):\n"
        "    p.write_text(str(i)); time.sleep(0.05)\n"
    )
    results = crash_runner.crash_at_points([sys.executable, "-c", code], seed=1, n=3,
                                           reset=lambda: (resets.append(1), marker.unlink(missing_ok=True)))
    assert len(resets) == 4  # the measured clean run + 3 crashes
    moments = [m for m, _ in results]
    assert moments == sorted(moments) and moments[-1] > moments[0]
    # a moment past the end of a (faster) later run lets it finish: count the hits
    assert all(out.returncode == (-signal.SIGKILL if out.killed else 0) for _, out in results)
    assert any(out.killed for _, out in results)


@pytest.mark.parametrize("kind", ["tmpfs", "ext4"])
def test_small_fs_runs_out_of_space(small_fs, kind: str) -> None:  # type: ignore[no-untyped-def]
    fs = small_fs(8 * MiB, kind)
    assert os.path.ismount(fs)
    with pytest.raises(OSError) as info, (fs / "big").open("wb") as f:
        for _ in range(16):
            f.write(b"\x01" * MiB)
            f.flush()
            os.fsync(f.fileno())
    assert info.value.errno == errno.ENOSPC


def test_fill_fs_leaves_the_asked_room(small_fs) -> None:  # type: ignore[no-untyped-def]
    fs = small_fs(4 * MiB)
    fill_fs(fs, free=256 * 1024)
    st = os.statvfs(fs)
    assert 0 < st.f_bavail * st.f_frsize <= 256 * 1024


def test_save_atomic_on_a_full_fs_leaves_no_file(small_fs) -> None:  # type: ignore[no-untyped-def]
    fs = small_fs(2 * MiB)
    fill_fs(fs, free=64 * 1024)
    with pytest.raises(errors.StorageError, match="no space left"):
        fsutil.save_atomic(fs / "manifest.json", b"x" * MiB)
    assert sorted(p.name for p in fs.iterdir()) == ["filler"]
