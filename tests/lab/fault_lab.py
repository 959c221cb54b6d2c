"""Fault injection for crash-safety tests: SIGKILL at random moments, full disks.

Fixtures (imported into tests/conftest.py):

* ``crash_runner`` (function): a :class:`CrashRunner`; ``crash_runner.run(argv)``
  runs a command to the end, ``crash_runner.kill_after(argv, seconds)`` SIGKILLs
  its whole process group after ``seconds`` (a crash of the tool and every
  child), ``crash_runner.kill_when(argv, predicate)`` kills as soon as
  ``predicate()`` is true (e.g. ``appears(folder, "*.partial")``);
  ``crash_runner.crash_at_points(argv, seed, n, reset)`` kills at ``n``
  deterministic moments of a measured clean run.
  :func:`kill_points` gives deterministic random moments inside a measured
  run time. Every process started is killed and reaped at test end.
* ``small_fs`` (function): factory ``small_fs(size, kind="tmpfs"|"ext4") ->
  Path``: a mounted, size-limited filesystem for ENOSPC tests, unmounted (and
  its loop device released) at test end. :func:`fill_fs` leaves exactly
  ``free`` bytes writable.

A SIGKILLed backup leaves its libvirt backup job running: call
``LabDomain.abort_job()`` before the next backup of that domain.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lab.common import LabError, run


@dataclass(frozen=True)
class Outcome:
    """How a run ended. ``killed``: we sent SIGKILL before it exited by itself."""

    argv: tuple[str, ...]
    returncode: int
    killed: bool
    elapsed: float
    stdout: str
    stderr: str

    @property
    def finished(self) -> bool:
        return not self.killed


def appears(folder: Path, pattern: str) -> Callable[[], bool]:
    """Predicate for ``kill_when``: a file matching ``pattern`` exists in ``folder``."""
    return lambda: any(folder.glob(pattern))


def kill_points(seed: int, n: int, duration: float, lo: float = 0.05, hi: float = 0.95) -> list[float]:
    """``n`` deterministic moments (seconds) spread over ``[lo, hi]`` of ``duration``.

    One point per equal slice, jittered inside it, so a small ``n`` still covers
    early, middle and late crashes.
    """
    rng = random.Random(seed)
    width = (hi - lo) / n
    return [duration * (lo + width * (i + rng.random())) for i in range(n)]


class CrashRunner:
    """Starts commands in their own process group; can SIGKILL the whole group."""

    def __init__(self, cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.cwd = cwd
        self.env = env
        self._procs: list[subprocess.Popen[str]] = []

    def _start(self, argv: Sequence[str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            list(argv), cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        self._procs.append(proc)
        return proc

    @staticmethod
    def _kill_group(proc: subprocess.Popen[str]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def _finish(self, proc: subprocess.Popen[str], argv: Sequence[str], start: float, killed: bool,
                timeout: float) -> Outcome:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_group(proc)
            out, err = proc.communicate()
            raise LabError(f"{' '.join(argv)}: still running after {timeout:.0f}s; killed") from None
        finally:
            self._kill_group(proc)  # stray children left in the group
        return Outcome(tuple(argv), proc.returncode, killed, time.monotonic() - start, out, err)

    def run(self, argv: Sequence[str], timeout: float = 300) -> Outcome:
        """Run to the end (to measure a clean run's duration)."""
        start = time.monotonic()
        return self._finish(self._start(argv), argv, start, False, timeout)

    def kill_after(self, argv: Sequence[str], seconds: float, *, sig: int = signal.SIGKILL,
                   timeout: float = 300) -> Outcome:
        """Send ``sig`` ``seconds`` after start, unless the command ended first."""
        return self.kill_when(argv, lambda: False, deadline=seconds, sig=sig, timeout=timeout)

    def kill_when(self, argv: Sequence[str], predicate: Callable[[], bool], *, deadline: float | None = None,
                  sig: int = signal.SIGKILL, poll: float = 0.005, timeout: float = 300) -> Outcome:
        """Send ``sig`` as soon as ``predicate()`` holds (or ``deadline`` seconds passed).

        SIGKILL goes to the whole process group (a crash of the tool and its
        children); any other signal (SIGTERM, SIGINT) only to the command
        itself, whose own cleanup is then under test. ``Outcome.killed`` is
        true when the signal was sent while the command still ran.
        """
        start = time.monotonic()
        proc = self._start(argv)
        killed = False
        while proc.poll() is None:
            elapsed = time.monotonic() - start
            if (deadline is not None and elapsed >= deadline) or predicate():
                if sig == signal.SIGKILL:
                    self._kill_group(proc)
                else:
                    proc.send_signal(sig)
                killed = True
                break
            if elapsed > timeout:
                break
            time.sleep(poll)
        outcome = self._finish(proc, argv, start, killed, timeout)
        if sig == signal.SIGKILL and killed and outcome.returncode != -signal.SIGKILL:
            # it ended on its own in the instant between poll() and kill
            return Outcome(outcome.argv, outcome.returncode, False, outcome.elapsed, outcome.stdout, outcome.stderr)
        return outcome

    def crash_at_points(self, argv: Sequence[str], seed: int, n: int, reset: Callable[[], None], *,
                        duration: float | None = None, sig: int = signal.SIGKILL) -> list[tuple[float, Outcome]]:
        """Kill ``argv`` at ``n`` deterministic moments of its clean run time.

        ``reset()`` runs before every attempt (e.g. abort the orphaned backup
        job, restore the starting state). ``duration`` defaults to one clean,
        measured run. Returns (kill moment, outcome) pairs for the caller to
        check what each crash left behind. Run times vary: a moment past the
        end of a faster run gives ``killed=False``; count the kills that hit.
        """
        if duration is None:
            reset()
            clean = self.run(argv)
            if clean.returncode != 0:
                raise LabError(f"{' '.join(argv)}: clean run failed ({clean.returncode}): {clean.stderr.strip()}")
            duration = clean.elapsed
        results = []
        for moment in kill_points(seed, n, duration):
            reset()
            results.append((moment, self.kill_after(argv, moment, sig=sig)))
        return results

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                self._kill_group(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=10)
        self._procs.clear()


@pytest.fixture
def crash_runner() -> Iterator[CrashRunner]:
    runner = CrashRunner()
    try:
        yield runner
    finally:
        runner.close()


# --------------------------------------------------------------------------
# small filesystems


@dataclass
class SmallFs:
    path: Path
    kind: str
    size: int
    image: Path | None = None  # ext4 backing file

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def unmount(self) -> None:
        if os.path.ismount(self.path):
            proc = run(["umount", str(self.path)], check=False)
            if proc.returncode != 0:
                run(["umount", "-l", str(self.path)], check=False)
        if self.image is not None:
            self.image.unlink(missing_ok=True)


def mount_small_fs(folder: Path, size: int, kind: str = "tmpfs") -> SmallFs:
    """Mount a size-limited filesystem on a new folder inside ``folder``."""
    if os.geteuid() != 0:
        pytest.skip("mounting a test filesystem needs root")
    mnt = folder / f"fs-{kind}-{uuid.uuid4().hex[:6]}"
    mnt.mkdir(parents=True)
    if kind == "tmpfs":
        run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "vnbdtest", str(mnt)])
        return SmallFs(mnt, kind, size)
    if kind == "ext4":
        if not shutil.which("mkfs.ext4"):
            pytest.skip("mkfs.ext4 missing")
        image = folder / f"{mnt.name}.img"
        with image.open("wb") as f:
            f.truncate(size)
        run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image)])
        run(["mount", "-o", "loop", str(image), str(mnt)])
        return SmallFs(mnt, kind, size, image)
    raise ValueError(f"unknown filesystem kind {kind!r}")


def mount_fragile_ext4(folder: Path, size: int) -> SmallFs:
    """An ext4 loop filesystem mounted ``errors=remount-ro``: :func:`turn_read_only` makes it read-only."""
    fs = mount_small_fs(folder, size, "ext4")
    run(["umount", str(fs.path)])
    run(["mount", "-o", "loop,errors=remount-ro", str(fs.image), str(fs.path)])
    return fs


def turn_read_only(fs: SmallFs) -> None:
    """What a failing disk does to a host: ext4 sees an error and remounts itself read-only."""
    dev = run(["findmnt", "-no", "SOURCE", str(fs.path)]).stdout.strip()
    Path(f"/sys/fs/ext4/{Path(dev).name}/trigger_fs_error").write_text("1")
    deadline = time.monotonic() + 5
    while not {"ro", "emergency_ro"} & set(_mount_options(fs.path)):
        if time.monotonic() > deadline:
            raise LabError(f"{fs.path} did not turn read-only")
        time.sleep(0.02)


def _mount_options(path: Path) -> list[str]:
    return run(["findmnt", "-no", "OPTIONS", str(path)]).stdout.strip().split(",")


def repair(fs: SmallFs) -> None:
    """The admin's fix: unmount, e2fsck, mount read-write again."""
    run(["umount", str(fs.path)])
    run(["e2fsck", "-fy", str(fs.image)], check=False)
    run(["mount", "-o", "loop,errors=remount-ro", str(fs.image), str(fs.path)])


def fill_fs(path: Path, free: int = 0, name: str = "filler") -> Path:
    """Fill the filesystem of ``path`` until about ``free`` bytes stay writable."""
    filler = path / name
    block = 64 * 1024
    with filler.open("ab") as f:
        while True:
            st = os.statvfs(path)
            avail = st.f_bavail * st.f_frsize
            if avail <= free:
                break
            try:
                f.write(b"\xff" * min(block, avail - free))
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                break
    return filler


@pytest.fixture
def small_fs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Path]]:
    """Factory ``small_fs(size, kind="tmpfs") -> Path`` of a mounted size-limited filesystem."""
    folder = tmp_path_factory.mktemp("smallfs", numbered=True)
    mounted: list[SmallFs] = []

    def factory(size: int, kind: str = "tmpfs") -> Path:
        fs = mount_small_fs(folder, size, kind)
        mounted.append(fs)
        return fs.path

    try:
        yield factory
    finally:
        for fs in reversed(mounted):
            fs.unmount()
